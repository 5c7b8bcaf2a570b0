/* The native sandbox agent: the same behaviour and frames as the Python agent
 * (strato/container/sandbox_agent.py), without an interpreter's start (under gVisor's
 * ptrace platform every system call costs tens of microseconds: Python's start and
 * imports were most of a sandbox's time to its first output).
 *
 * One thread runs an event loop (here) over the channel, every process's output and
 * stdin, and a self-pipe its signal handlers write to (SIGCHLD: reap; SIGTERM: stop).
 * Processes (proc.c) are started with clone(CLONE_VM | CLONE_VFORK) (no copy of the
 * address space), each in a session of its own. File operations (files.c) and tunnels
 * (tunnel.c) run on threads of their own, so a FIFO or a slow client never stalls the
 * channel; every frame goes out under one lock.
 *
 * Frames from the channel are checked (wire.c); one that is malformed ends the agent as
 * the end of the channel does: its processes are killed and it exits 0. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define RECV_CHUNK (1 << 20)

extern char **environ;

pthread_mutex_t send_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t workdir_lock = PTHREAD_MUTEX_INITIALIZER;
const char *g_channel, *g_container_id;
char *g_token;
int g_chan = -1;
static int wake_r = -1, wake_w = -1;
static char *workdir;

/* ---------------------------------------------------------------- small helpers */

void die_oom(void) {
    static const char msg[] = "strato sandbox agent: out of memory\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(1);
}

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p)
        die_oom();
    return p;
}

void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p)
        die_oom();
    return p;
}

char *xstrdup(const char *s) {
    char *p = strdup(s);
    if (!p)
        die_oom();
    return p;
}

int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool chan_send(struct buf *frame) {
    bool ok = true;
    pthread_mutex_lock(&send_lock);
    size_t off = 0;
    while (off < frame->len) {
        ssize_t n = send(g_chan, frame->p + off, frame->len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            ok = false;
            break;
        }
        off += (size_t)n;
    }
    pthread_mutex_unlock(&send_lock);
    return ok;
}

char *current_workdir(void) {
    pthread_mutex_lock(&workdir_lock);
    char *w = xstrdup(workdir);
    pthread_mutex_unlock(&workdir_lock);
    return w;
}

static void set_workdir(char *w) {
    pthread_mutex_lock(&workdir_lock);
    free(workdir);
    workdir = w;
    pthread_mutex_unlock(&workdir_lock);
}

/* ---------------------------------------------------------------- the channel's frames */

static bool as_int(const struct val *v, int64_t *out) {
    if (!v || v->t != V_INT)
        return false;
    *out = v->u.i;
    return true;
}

static bool is_str_list(const struct val *v) {
    if (!v || v->t != V_ARR)
        return false;
    for (size_t i = 0; i < v->n; i++)
        if (v->u.items[i].t != V_STR)
            return false;
    return true;
}

/* optional fields: absent is the default; present must have its type */
static bool opt_bool(const struct val *m, const char *name, bool *out) {
    const struct val *v = mp_get(m, name);
    if (!v)
        return true;
    if (v->t != V_BOOL)
        return false;
    *out = v->u.b;
    return true;
}

static bool opt_int(const struct val *m, const char *name, int64_t *out) {
    const struct val *v = mp_get(m, name);
    return !v || as_int(v, out);
}

static bool terminal_size(const struct val *v, int64_t *rows, int64_t *cols) {
    return v && v->t == V_ARR && v->n == 2 && as_int(&v->u.items[0], rows) &&
           as_int(&v->u.items[1], cols);
}

static char **str_list(const struct val *v, size_t *count, bool *bad) {
    char **out = xmalloc((v->n + 1) * sizeof(char *));
    size_t n = 0;
    for (size_t i = 0; i < v->n; i++) {
        char *s = mp_cstring(&v->u.items[i]);
        if (!s) {
            *bad = true;
            continue;
        }
        out[n++] = s;
    }
    out[n] = NULL;
    *count = n;
    return out;
}

static void apply_flow(int64_t id, int64_t stream, bool paused) {
    struct proc *p = find_proc(id);
    if (p && (stream == 1 || stream == 2))
        p->paused[stream] = paused;
}

/* false: malformed (the agent ends) */
/* the sandbox's entrypoint (a list of strings, checked): process 1, which the sandbox
   ends with */
static void start_entrypoint(const struct val *entry) {
    struct exec_req q = {0};
    q.id = 1;
    q.argv = str_list(entry, &q.argc, &q.bad);
    do_exec(&q, true);
    free_strv(q.argv);
}

static bool handle(const struct val *msg, bool *stopping) {
    const struct val *tag = mp_get(msg, "t");
    if (!msg || msg->t != V_MAP || !tag || tag->t != V_STR)
        return false;
    if (mp_is_str(tag, "sbexec")) {
        struct exec_req q = {0};
        const struct val *argv = mp_get(msg, "argv"), *wd = mp_get(msg, "workdir");
        const struct val *to = mp_get(msg, "timeout"), *size = mp_get(msg, "size");
        q.env = mp_get(msg, "env");
        if (!as_int(mp_get(msg, "pid"), &q.id) || !is_str_list(argv) ||
            (wd && wd->t != V_NIL && wd->t != V_STR) ||
            (to && to->t != V_NIL && to->t != V_FLOAT && to->t != V_INT) ||
            !opt_bool(msg, "pty", &q.pty) || !env_is_map(q.env) ||
            (size && size->t != V_NIL && !terminal_size(size, &q.rows, &q.cols)))
            return false;
        q.has_size = size && size->t != V_NIL;
        if (to && to->t != V_NIL)
            q.timeout = to->t == V_FLOAT ? to->u.f : (double)to->u.i;
        if (q.timeout < 0 || q.timeout != q.timeout)
            q.timeout = 0;
        q.argv = str_list(argv, &q.argc, &q.bad);
        if (wd && wd->t == V_STR) {
            q.workdir = mp_cstring(wd);
            q.bad |= !q.workdir;
        }
        do_exec(&q, false);
        free_strv(q.argv);
        free(q.workdir);
    } else if (mp_is_str(tag, "sbstdin")) {
        int64_t id;
        bool eof = false;
        const struct val *data = mp_get(msg, "data");
        if (!as_int(mp_get(msg, "pid"), &id) || (data && data->t != V_BIN) ||
            !opt_bool(msg, "eof", &eof))
            return false;
        struct proc *p = find_proc(id);
        if (p) {
            stdin_queue(p, data ? data->u.s : NULL, data ? data->n : 0, eof);
            stdin_write(p);
        }
    } else if (mp_is_str(tag, "sbfile")) {
        int64_t id;
        const struct val *r = mp_get(msg, "request");
        if (!as_int(mp_get(msg, "req_id"), &id) || !r || r->t != V_MAP)
            return false;
        const struct val *op = mp_get(r, "op"), *path = mp_get(r, "path");
        const struct val *data = mp_get(r, "data");
        struct file_req *q = xmalloc(sizeof *q);
        memset(q, 0, sizeof *q);
        if (!op || op->t != V_STR || !path || path->t != V_STR ||
            !opt_int(r, "offset", &q->offset) || !opt_int(r, "length", &q->length) ||
            (data && data->t != V_BIN) || !opt_bool(r, "append", &q->append) ||
            !opt_bool(r, "truncate", &q->truncate) || !opt_bool(r, "recursive", &q->recursive)) {
            free(q);
            return false;
        }
        q->req_id = id;
        q->op = mp_cstring(op);
        if (!q->op)
            q->op = xstrdup("?");
        q->path = mp_cstring(path);
        if (!q->path) {
            q->path = xstrdup("");
            q->path_has_nul = true;
        }
        if (data && data->n) {
            q->data = xmalloc(data->n);
            memcpy(q->data, data->u.s, data->n);
            q->data_len = data->n;
        }
        file_start(q);
    } else if (mp_is_str(tag, "sbconf")) { /* handed out from the warm pool */
        const struct val *env = mp_get(msg, "env"), *wd = mp_get(msg, "workdir");
        const struct val *entry = mp_get(msg, "entrypoint");
        if (!env_is_map(env) || (wd && wd->t != V_NIL && wd->t != V_STR) ||
            (entry && !is_str_list(entry)))
            return false;
        env_apply(&base_env, env);
        if (wd && wd->t == V_STR && wd->n) {
            char *w = mp_cstring(wd);
            if (w)
                set_workdir(w);
        }
        if (entry && entry->n)
            start_entrypoint(entry);
    } else if (mp_is_str(tag, "sbresize")) {
        int64_t id, rows, cols;
        if (!as_int(mp_get(msg, "pid"), &id) ||
            !terminal_size(mp_get(msg, "size"), &rows, &cols))
            return false;
        struct proc *p = find_proc(id);
        if (p && p->is_pty && p->fds[1] >= 0 && !p->exited) {
            struct winsize ws = {(unsigned short)rows, (unsigned short)cols, 0, 0};
            ioctl(p->fds[1], TIOCSWINSZ, &ws);
        }
    } else if (mp_is_str(tag, "sbtunopen")) { /* a client of a port: a pipe to it */
        int64_t conn, port;
        if (!as_int(mp_get(msg, "conn_id"), &conn) || !as_int(mp_get(msg, "port"), &port))
            return false;
        tunnel_start(conn, port);
    } else if (mp_is_str(tag, "sbflow")) {
        int64_t id, stream;
        const struct val *paused = mp_get(msg, "paused");
        if (!as_int(mp_get(msg, "pid"), &id) || !as_int(mp_get(msg, "stream"), &stream) ||
            !paused || paused->t != V_BOOL)
            return false;
        apply_flow(id, stream, paused->u.b);
    } else if (mp_is_str(tag, "stop")) {
        const struct val *grace = mp_get(msg, "grace_s");
        if (grace && grace->t != V_FLOAT && grace->t != V_INT)
            return false;
        *stopping = true;
    }
    /* any other tag: a message the agent does not handle (ignored) */
    return true;
}

/* ---------------------------------------------------------------- the loop */

static uint8_t *in_buf;
static size_t in_len, in_cap;

/* read what the channel has; false at its end or on a malformed frame */
static bool read_channel(bool *stopping) {
    if (in_cap - in_len < RECV_CHUNK / 16) {
        size_t want = in_cap ? in_cap * 2 : (64 << 10);
        if (in_len >= 4) {
            size_t n = ((size_t)in_buf[0] << 24) | ((size_t)in_buf[1] << 16) |
                       ((size_t)in_buf[2] << 8) | in_buf[3];
            if (n > MAX_BODY)
                return false;
            if (want < 4 + n)
                want = 4 + n;
        }
        if (want > in_cap) {
            in_buf = xrealloc(in_buf, want);
            in_cap = want;
        }
    }
    size_t room = in_cap - in_len;
    if (room > RECV_CHUNK)
        room = RECV_CHUNK;
    ssize_t got = recv(g_chan, in_buf + in_len, room, MSG_DONTWAIT);
    if (got < 0)
        return errno == EAGAIN || errno == EINTR;
    if (got == 0)
        return false;
    in_len += (size_t)got;
    size_t pos = 0;
    while (in_len - pos >= 4 && !*stopping) {
        const uint8_t *h = in_buf + pos;
        size_t n = ((size_t)h[0] << 24) | ((size_t)h[1] << 16) | ((size_t)h[2] << 8) | h[3];
        if (n > MAX_BODY)
            return false;
        if (in_len - pos - 4 < n)
            break;
        struct val *msg = mp_decode(h + 4, n);
        bool ok = msg && handle(msg, stopping);
        mp_free(msg);
        if (!ok)
            return false;
        pos += 4 + n;
    }
    memmove(in_buf, in_buf + pos, in_len - pos);
    in_len -= pos;
    return true;
}

static void on_signal(int sig) {
    int saved = errno;
    char c = (char)sig;
    ssize_t r = write(wake_w, &c, 1);
    (void)r;
    errno = saved;
}

static void stop(int code) {
    kill_all();
    _exit(code);
}

static int serve(void) {
    uint8_t *chunk = xmalloc(READ_SIZE);
    struct pollfd *fds = NULL;
    struct proc **owners = NULL;
    int *streams = NULL;
    size_t cap = 0;
    bool stopping = false;
    while (!stopping) {
        size_t n = 0, want = 2;
        for (struct proc *p = procs; p; p = p->next)
            want += 3;
        if (want > cap) {
            cap = want * 2;
            fds = xrealloc(fds, cap * sizeof *fds);
            owners = xrealloc(owners, cap * sizeof *owners);
            streams = xrealloc(streams, cap * sizeof *streams);
        }
        fds[n] = (struct pollfd){g_chan, POLLIN, 0};
        owners[n] = NULL;
        streams[n++] = 0;
        fds[n] = (struct pollfd){wake_r, POLLIN, 0};
        owners[n] = NULL;
        streams[n++] = -1;
        int64_t now = now_ms(), timeout = -1;
        for (struct proc *p = procs; p; p = p->next) {
            for (int s = 1; s <= 2; s++) {
                if (p->fds[s] >= 0 && !p->paused[s]) {
                    fds[n] = (struct pollfd){p->fds[s], POLLIN, 0};
                    owners[n] = p;
                    streams[n++] = s;
                }
            }
            if (p->stdin_fd >= 0 && p->in_head) {
                fds[n] = (struct pollfd){p->stdin_fd, POLLOUT, 0};
                owners[n] = p;
                streams[n++] = 0;
            }
            int64_t due = -1;
            if (p->deadline && !p->exited && !p->timed_out)
                due = p->deadline;
            else if (p->exited && !p->exit_sent)
                due = p->exited_at + EXIT_AFTER_EOF_MS;
            if (due >= 0) {
                int64_t left = due > now ? due - now : 0;
                if (timeout < 0 || left < timeout)
                    timeout = left;
            }
        }
        int r = poll(fds, n, (int)(timeout > 600000 ? 600000 : timeout));
        if (r < 0 && errno != EINTR)
            break;
        size_t size = 0;
        for (size_t i = 2; r > 0 && i < n; i++) { /* output first: one frame a wake-up */
            if (!fds[i].revents || streams[i] == 0 || size >= FRAME_BYTES)
                continue;
            struct proc *p = owners[i];
            if (p->fds[streams[i]] == fds[i].fd)
                size += read_stream(p, streams[i], chunk);
        }
        if (r > 0 && fds[1].revents) { /* signals: SIGCHLD (reap), SIGTERM (stop) */
            char sigs[64];
            ssize_t got = read(wake_r, sigs, sizeof sigs);
            for (ssize_t i = 0; i < got; i++)
                if (sigs[i] == SIGTERM)
                    stop(0);
            reap(); /* (only then: under gVisor's ptrace each system call counts) */
        }
        end_terminals(chunk);
        if (!out_flush())
            break;
        for (size_t i = 2; r > 0 && i < n; i++)
            if (fds[i].revents && streams[i] == 0 && owners[i]->stdin_fd == fds[i].fd)
                stdin_write(owners[i]);
        now = now_ms();
        for (struct proc *p = procs; p; p = p->next) {
            if (p->deadline && !p->exited && !p->timed_out && now >= p->deadline) {
                p->timed_out = true;
                kill_group(p);
            }
        }
        report_exits();
        if (r > 0 && fds[0].revents && !read_channel(&stopping))
            break;
    }
    kill_all();
    return 0;
}

/* ---------------------------------------------------------------- start */

/* overwrite NAME's value in the initial environment block (which /proc/PID/environ
 * shows, gVisor even to a process of another session), then unset it */
static void erase_environ(const char *name) {
    size_t n = strlen(name);
    for (char **e = environ; e && *e; e++)
        if (!strncmp(*e, name, n) && (*e)[n] == '=')
            memset(*e + n + 1, '0', strlen(*e + n + 1));
    unsetenv(name);
}

static char *required_env(const char *name) {
    const char *v = getenv(name);
    if (!v || !*v) {
        fprintf(stderr, "strato sandbox agent: %s is not set\n", name);
        exit(2);
    }
    return xstrdup(v);
}

static void send_hello(void) {
    struct buf b = {0};
    frame_begin(&b);
    mp_map(&b, 3);
    mp_cstr(&b, "t");
    mp_cstr(&b, "hello");
    mp_cstr(&b, "container_id");
    mp_cstr(&b, g_container_id);
    mp_cstr(&b, "token");
    mp_cstr(&b, g_token);
    frame_end(&b);
    if (!chan_send(&b)) {
        fprintf(stderr, "strato sandbox agent: the channel closed\n");
        exit(1);
    }
    buf_free(&b);
}

static void send_ready(void) {
    struct buf b = {0};
    frame_begin(&b);
    mp_map(&b, 1);
    mp_cstr(&b, "t");
    mp_cstr(&b, "ready");
    frame_end(&b);
    chan_send(&b);
    buf_free(&b);
}

static uint8_t *read_file(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 64 << 10, n = 0;
    uint8_t *data = xmalloc(cap);
    for (;;) {
        if (n == cap) {
            if (cap >= MAX_BODY) {
                close(fd);
                free(data);
                errno = EFBIG;
                return NULL;
            }
            cap *= 2;
            data = xrealloc(data, cap);
        }
        ssize_t r = read(fd, data + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            free(data);
            errno = e;
            return NULL;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    *len = n;
    return data;
}

static int makedirs_quiet(char *path) {
    if (mkdir(path, 0777) == 0 || errno == EEXIST)
        return 0;
    if (errno != ENOENT)
        return -1;
    char *slash = strrchr(path, '/');
    if (!slash || slash == path)
        return -1;
    *slash = 0;
    int r = makedirs_quiet(path);
    *slash = '/';
    if (r < 0)
        return -1;
    return mkdir(path, 0777) == 0 || errno == EEXIST ? 0 : -1;
}

int main(void) {
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); /* its processes run as its user */
    g_token = required_env("STRATO_CONTAINER_TOKEN");
    erase_environ("STRATO_CONTAINER_TOKEN");
    g_container_id = required_env("STRATO_CONTAINER_ID");
    g_channel = required_env("STRATO_CHANNEL");
    char *spec_path = required_env("STRATO_CONTAINER_SPEC");

    /* the spec: its env, and its sandbox's entrypoint and workdir */
    size_t spec_len = 0;
    uint8_t *spec_data = read_file(spec_path, &spec_len);
    if (!spec_data) {
        fprintf(stderr, "strato sandbox agent: %s: %s\n", spec_path, strerror(errno));
        return 2;
    }
    struct val *spec = mp_decode(spec_data, spec_len);
    const struct val *sandbox = mp_get(spec, "sandbox");
    const struct val *spec_env = mp_get(spec, "env");
    const struct val *entry = mp_get(sandbox, "entrypoint");
    const struct val *spec_wd = mp_get(sandbox, "workdir");
    if (!spec || spec->t != V_MAP || !sandbox || sandbox->t != V_MAP ||
        !env_is_map(spec_env) || (entry && !is_str_list(entry)) ||
        (spec_wd && spec_wd->t != V_NIL && spec_wd->t != V_STR)) {
        fprintf(stderr, "strato sandbox agent: the container's spec has no sandbox\n");
        return 2;
    }

    int wake[2];
    if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) < 0)
        return 1;
    wake_r = wake[0];
    wake_w = wake[1];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    g_chan = dial_channel(g_channel, 10000);
    if (g_chan < 0) {
        fprintf(stderr, "strato sandbox agent: cannot reach %s: %s\n", g_channel,
                strerror(errno));
        return 1;
    }
    send_hello();

    /* its processes' environment: its own, but strato's variables */
    for (char **e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || !strncmp(*e, "STRATO_", 7) || !strncmp(*e, "PYTHONPATH=", 11))
            continue;
        env_set(&base_env, *e, (size_t)(eq - *e), eq + 1);
    }
    env_apply(&base_env, spec_env);
    if (spec_wd && spec_wd->t == V_STR && spec_wd->n) {
        char *w = mp_cstring(spec_wd);
        workdir = w ? w : xstrdup("/");
    } else {
        char *cwd = getcwd(NULL, 0);
        workdir = cwd ? cwd : xstrdup("/");
    }
    struct stat st;
    if (stat(workdir, &st) < 0 || !S_ISDIR(st.st_mode)) { /* made as Docker's WORKDIR */
        char *w = xstrdup(workdir);
        makedirs_quiet(w); /* (where it may: else each exec fails with the reason) */
        free(w);
    }
    if (entry && entry->n)
        start_entrypoint(entry);
    mp_free(spec);
    free(spec_data);
    send_ready();
    _exit(serve());
}
