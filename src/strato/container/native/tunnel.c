/* Tunnels (SbTunnelOpen): connect to the port inside the sandbox, dial the channel again
 * for the client the control plane holds (SbTunnelHello), then pipe bytes both ways (a
 * thread each way: a slow client never stalls the channel or another tunnel). */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CONNECT_MS 5000
#define TUNNEL_READ (256 << 10)

/* connect with a timeout; -1 with errno (ETIMEDOUT when it ran out) */
static int connect_to(int family, const struct sockaddr *addr, socklen_t len, int timeout_ms) {
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, addr, len) < 0) {
        if (errno != EINPROGRESS) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        struct pollfd p = {fd, POLLOUT, 0};
        int r;
        do
            r = poll(&p, 1, timeout_ms);
        while (r < 0 && errno == EINTR);
        int err = 0;
        socklen_t n = sizeof err;
        if (r == 0)
            err = ETIMEDOUT;
        else if (r < 0)
            err = errno;
        else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0)
            err = errno;
        if (err) {
            close(fd);
            errno = err;
            return -1;
        }
    }
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    if (family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

/* tcp:host:port with a numeric host (or localhost): the address, else false */
static bool tcp_address(const char *rest, struct sockaddr_storage *ss, socklen_t *len) {
    const char *colon = strrchr(rest, ':');
    if (!colon || !colon[1])
        return false;
    char host[256];
    size_t hn = (size_t)(colon - rest);
    if (hn >= sizeof host)
        return false;
    memcpy(host, rest, hn);
    host[hn] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535)
        return false;
    if (hn >= 2 && host[0] == '[' && host[hn - 1] == ']') {
        memmove(host, host + 1, hn - 2);
        host[hn - 2] = 0;
    }
    if (!strcmp(host, "localhost"))
        strcpy(host, "127.0.0.1");
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof *in4;
        return true;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof *in6;
        return true;
    }
    return false;
}

int dial_channel(const char *address, int timeout_ms) {
    if (!strncmp(address, "unix:", 5)) {
        struct sockaddr_un un = {0};
        un.sun_family = AF_UNIX;
        if (strlen(address + 5) >= sizeof un.sun_path) {
            errno = ENAMETOOLONG;
            return -1;
        }
        strcpy(un.sun_path, address + 5);
        return connect_to(AF_UNIX, (struct sockaddr *)&un, sizeof un, timeout_ms);
    }
    struct sockaddr_storage ss;
    socklen_t len;
    if (strncmp(address, "tcp:", 4) || !tcp_address(address + 4, &ss, &len)) {
        errno = EINVAL;
        return -1;
    }
    return connect_to(ss.ss_family, (struct sockaddr *)&ss, len, timeout_ms);
}

static bool send_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

struct pipe_ends {
    int src, dst;
};

/* bytes from src to dst until src ends (then half-close dst); on an error both are shut
 * down, which ends the other direction too */
static void *pipe_bytes(void *arg) {
    struct pipe_ends *e = arg;
    uint8_t *chunk = xmalloc(TUNNEL_READ);
    for (;;) {
        ssize_t n = recv(e->src, chunk, TUNNEL_READ, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0) {
            shutdown(e->dst, SHUT_WR);
            break;
        }
        if (n < 0 || !send_all(e->dst, chunk, (size_t)n)) {
            shutdown(e->src, SHUT_RDWR);
            shutdown(e->dst, SHUT_RDWR);
            break;
        }
    }
    free(chunk);
    return NULL;
}

struct tunnel {
    int64_t conn_id, port;
};

static void *tunnel_thread(void *arg) {
    struct tunnel t = *(struct tunnel *)arg;
    free(arg);
    int port = -1;
    char error[512] = "";
    if (t.port >= 0 && t.port <= 65535) {
        struct sockaddr_in in4 = {0};
        in4.sin_family = AF_INET;
        in4.sin_port = htons((uint16_t)t.port);
        in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        struct sockaddr_in6 in6 = {0};
        in6.sin6_family = AF_INET6;
        in6.sin6_port = htons((uint16_t)t.port);
        in6.sin6_addr = in6addr_loopback;
        const struct sockaddr *addrs[2] = {(struct sockaddr *)&in4, (struct sockaddr *)&in6};
        socklen_t lens[2] = {sizeof in4, sizeof in6};
        int families[2] = {AF_INET, AF_INET6};
        for (int i = 0; i < 2 && port < 0; i++) {
            port = connect_to(families[i], addrs[i], lens[i], CONNECT_MS);
            if (port < 0) {
                int e = errno;
                if (e == ETIMEDOUT)
                    snprintf(error, sizeof error,
                             "nothing accepts connections on port %lld in the sandbox (timed out)",
                             (long long)t.port);
                else
                    snprintf(error, sizeof error,
                             "nothing accepts connections on port %lld in the sandbox ([Errno %d] %s)",
                             (long long)t.port, e, strerror(e));
            }
        }
    } else {
        snprintf(error, sizeof error, "nothing accepts connections on port %lld in the sandbox",
                 (long long)t.port);
    }
    if (port >= 0)
        error[0] = 0;
    int ch = dial_channel(g_channel, 10000);
    if (ch < 0) {
        if (port >= 0)
            close(port);
        return NULL;
    }
    struct buf b = {0};
    frame_begin(&b);
    mp_map(&b, 5);
    mp_cstr(&b, "t");
    mp_cstr(&b, "sbtunnel");
    mp_cstr(&b, "container_id");
    mp_cstr(&b, g_container_id);
    mp_cstr(&b, "token");
    mp_cstr(&b, g_token);
    mp_cstr(&b, "conn_id");
    mp_int(&b, t.conn_id);
    mp_cstr(&b, "error");
    mp_cstr(&b, error);
    frame_end(&b);
    bool sent = send_all(ch, b.p, b.len);
    buf_free(&b);
    if (!sent || port < 0) {
        if (port >= 0)
            close(port);
        close(ch);
        return NULL;
    }
    struct pipe_ends back = {ch, port}, forth = {port, ch};
    pthread_t other;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10);
    if (pthread_create(&other, &attr, pipe_bytes, &back) == 0) {
        pipe_bytes(&forth);
        pthread_join(other, NULL);
    }
    pthread_attr_destroy(&attr);
    close(port);
    close(ch);
    return NULL;
}

void tunnel_start(int64_t conn_id, int64_t port) {
    struct tunnel *t = xmalloc(sizeof *t);
    t->conn_id = conn_id;
    t->port = port;
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 << 10);
    if (pthread_create(&th, &attr, tunnel_thread, t) != 0)
        free(t);
    pthread_attr_destroy(&attr);
}
