/* The native sandbox agent: the same behaviour and frames as the Python agent
 * (strato/container/sandbox_agent.py), without an interpreter's start (under gVisor's
 * ptrace platform every system call costs tens of microseconds: Python's start and
 * imports were most of a sandbox's time to its first output).
 *
 * One thread runs an event loop over the channel, every process's output and stdin, and
 * a self-pipe its signal handlers write to (SIGCHLD: reap; SIGTERM: stop). Processes are
 * started with clone(CLONE_VM | CLONE_VFORK) (no copy of the address space), each in a
 * session of its own. File operations and tunnels run on threads of their own, so a FIFO
 * or a slow client never stalls the channel; every frame goes out under one lock.
 *
 * Frames from the channel are checked (wire.c); one that is malformed ends the agent as
 * the end of the channel does: its processes are killed and it exits 0. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE (64 << 10)
#define FRAME_BYTES (1 << 20)   /* an output frame carries at most about this much */
#define EXIT_AFTER_EOF_MS 1000  /* a process's exit waits this long for its streams' end */
#define SHELL "/bin/sh"
#define RECV_CHUNK (1 << 20)

extern char **environ;

pthread_mutex_t send_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t workdir_lock = PTHREAD_MUTEX_INITIALIZER;
const char *g_channel, *g_container_id;
char *g_token;
static int chan = -1;
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

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool chan_send(struct buf *frame) {
    bool ok = true;
    pthread_mutex_lock(&send_lock);
    size_t off = 0;
    while (off < frame->len) {
        ssize_t n = send(chan, frame->p + off, frame->len - off, MSG_NOSIGNAL);
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

/* ---------------------------------------------------------------- the environment */

struct env {
    char **items; /* "NAME=value", owned */
    size_t n, cap;
};

static struct env base_env;

static void env_set(struct env *e, const char *name, size_t name_len, const char *value) {
    char *item = xmalloc(name_len + strlen(value) + 2);
    memcpy(item, name, name_len);
    item[name_len] = '=';
    strcpy(item + name_len + 1, value);
    for (size_t i = 0; i < e->n; i++) {
        if (!strncmp(e->items[i], item, name_len + 1)) {
            free(e->items[i]);
            e->items[i] = item;
            return;
        }
    }
    if (e->n + 1 >= e->cap) {
        e->cap = e->cap ? 2 * e->cap : 64;
        e->items = xrealloc(e->items, e->cap * sizeof(char *));
    }
    e->items[e->n++] = item;
    e->items[e->n] = NULL;
}

static void env_copy(struct env *dst, const struct env *src) {
    dst->n = 0;
    dst->cap = src->n + 16;
    dst->items = xmalloc(dst->cap * sizeof(char *));
    for (size_t i = 0; i < src->n; i++)
        dst->items[dst->n++] = xstrdup(src->items[i]);
    dst->items[dst->n] = NULL;
}

static void env_free(struct env *e) {
    for (size_t i = 0; i < e->n; i++)
        free(e->items[i]);
    free(e->items);
    e->items = NULL;
    e->n = e->cap = 0;
}

static const char *env_get(const struct env *e, const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; i < e->n; i++)
        if (!strncmp(e->items[i], name, n) && e->items[i][n] == '=')
            return e->items[i] + n + 1;
    return NULL;
}

/* whether `map` is absent or a msgpack {str: str} */
static bool env_is_map(const struct val *map) {
    if (!map)
        return true;
    if (map->t != V_MAP)
        return false;
    for (size_t i = 0; i < map->n; i++)
        if (map->u.items[2 * i].t != V_STR || map->u.items[2 * i + 1].t != V_STR)
            return false;
    return true;
}

/* apply a checked map; false (nothing more applied) at a name or value it cannot pass */
static bool env_apply(struct env *e, const struct val *map) {
    if (!map)
        return true;
    for (size_t i = 0; i < map->n; i++) {
        const struct val *k = &map->u.items[2 * i], *v = &map->u.items[2 * i + 1];
        char *name = mp_cstring(k), *value = mp_cstring(v);
        bool ok = name && value && name[0] && !strchr(name, '=');
        if (ok)
            env_set(e, name, strlen(name), value);
        free(name);
        free(value);
        if (!ok)
            return false;
    }
    return true;
}

/* ---------------------------------------------------------------- processes */

struct chunk {
    struct chunk *next;
    size_t len, off;
    bool eof;
    uint8_t data[];
};

struct proc {
    struct proc *next;
    int64_t id;            /* the control plane's pid */
    pid_t pid;             /* 0 once reaped */
    int fds[3];            /* [1], [2]: its output streams' read ends (-1: ended) */
    bool paused[3];
    int stdin_fd;          /* -1: closed (or never had one) */
    bool stdin_done;       /* eof written, or writing failed: nothing more is written */
    bool is_pty;
    struct chunk *in_head, *in_tail;
    int64_t deadline;      /* its timeout (0: none) */
    double timeout;
    bool timed_out;
    bool exited;           /* reaped, its code in status */
    int status;
    int64_t exited_at;
    bool exit_sent;
    bool entrypoint;
};

static struct proc *procs;

static struct proc *find_proc(int64_t id) {
    for (struct proc *p = procs; p; p = p->next)
        if (p->id == id)
            return p;
    return NULL;
}

static void set_nonblock(int fd) {
    int one = 1;
    ioctl(fd, FIONBIO, &one);
}

static void kill_group(struct proc *p) {
    if (p->pid > 0 && !p->exited && killpg(p->pid, SIGKILL) < 0)
        kill(p->pid, SIGKILL);
}

static void kill_all(void) {
    for (struct proc *p = procs; p; p = p->next)
        kill_group(p);
}

static const char *signal_name(int sig) {
    static const char *names[] = {
        NULL,       "SIGHUP",  "SIGINT",    "SIGQUIT", "SIGILL",    "SIGTRAP", "SIGABRT",
        "SIGBUS",   "SIGFPE",  "SIGKILL",   "SIGUSR1", "SIGSEGV",   "SIGUSR2", "SIGPIPE",
        "SIGALRM",  "SIGTERM", "SIGSTKFLT", "SIGCHLD", "SIGCONT",   "SIGSTOP", "SIGTSTP",
        "SIGTTIN",  "SIGTTOU", "SIGURG",    "SIGXCPU", "SIGXFSZ",   "SIGVTALRM", "SIGPROF",
        "SIGWINCH", "SIGIO",   "SIGPWR",    "SIGSYS"};
    if (sig > 0 && sig < 32)
        return names[sig];
    if (sig == 34)
        return "SIGRTMIN";
    if (sig == 64)
        return "SIGRTMAX";
    return NULL;
}

static void send_exit(int64_t id, int64_t code, const char *reason) {
    struct buf b = {0};
    frame_begin(&b);
    mp_map(&b, 4);
    mp_cstr(&b, "t");
    mp_cstr(&b, "sbexit");
    mp_cstr(&b, "pid");
    mp_int(&b, id);
    mp_cstr(&b, "returncode");
    mp_int(&b, code);
    mp_cstr(&b, "reason");
    mp_cstr(&b, reason);
    frame_end(&b);
    chan_send(&b);
    buf_free(&b);
}

/* the start failed: its stdout ends, stderr says why, and it exits with `code` */
static void fail_start(int64_t id, const char *message, int code) {
    struct buf b = {0};
    frame_begin(&b);
    mp_map(&b, 2);
    mp_cstr(&b, "t");
    mp_cstr(&b, "sbout");
    mp_cstr(&b, "chunks");
    mp_array(&b, 2);
    mp_array(&b, 4);
    mp_int(&b, id);
    mp_int(&b, 1);
    mp_bin(&b, NULL, 0);
    mp_bool(&b, true);
    mp_array(&b, 4);
    mp_int(&b, id);
    mp_int(&b, 2);
    mp_bin(&b, message, strlen(message));
    mp_bool(&b, true);
    frame_end(&b);
    chan_send(&b);
    buf_free(&b);
    /* the reason: the message stripped, at most 1000 characters */
    size_t start = 0, end = strlen(message);
    while (start < end && strchr(" \t\n\r\v\f", message[start]))
        start++;
    while (end > start && strchr(" \t\n\r\v\f", message[end - 1]))
        end--;
    char *reason = xmalloc(end - start + 1);
    size_t n = 0, chars = 0;
    for (size_t i = start; i < end; i++) {
        if (((unsigned char)message[i] & 0xC0) != 0x80 && ++chars > 1000)
            break;
        reason[n++] = message[i];
    }
    reason[n] = 0;
    send_exit(id, code, reason);
    free(reason);
}

/* what the child of a spawn does, on the parent's memory (CLONE_VM | CLONE_VFORK): only
 * system calls, then exec; its error (and where) is left in `err`/`stage` */
struct spawn {
    char **argv, **envp;
    char **paths; /* the candidates for argv[0] */
    const char *cwd;
    int fd0, fd1, fd2; /* what becomes 0, 1, 2 */
    bool pty;
    int err;
    int stage; /* 1: chdir; 2: exec; 3: set-up */
};

static int child_main(void *arg) {
    struct spawn *s = arg;
    /* (exec resets the handlers; of the signals it ignores, SIGPIPE is the agent's) */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGPIPE, &dfl, NULL);
    s->stage = 3;
    if (setsid() < 0)
        goto fail;
    if (dup2(s->fd0, 0) < 0 || dup2(s->fd1, 1) < 0 || dup2(s->fd2, 2) < 0)
        goto fail;
    if (s->pty && ioctl(0, TIOCSCTTY, 0) < 0)
        goto fail;
    if (s->cwd && chdir(s->cwd) < 0) {
        s->stage = 1;
        goto fail;
    }
    s->stage = 2;
    sigset_t none; /* (the parent blocked every signal around the clone) */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int saved = 0, last = ENOENT; /* (s->err is set only when no program ran) */
    for (char **path = s->paths; *path; path++) {
        execve(*path, s->argv, s->envp);
        last = errno;
        if (last != ENOENT && last != ENOTDIR && !saved)
            saved = last;
    }
    s->err = saved ? saved : last;
    _exit(127);
fail:
    s->err = errno;
    _exit(127);
}

static char child_stack[64 << 10] __attribute__((aligned(16)));

/* start it; its pid, or -1 with s->err / s->stage set */
static pid_t spawn(struct spawn *s) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* no handler runs in the child */
    s->err = 0;
    s->stage = 0;
    pid_t pid = clone(child_main, child_stack + sizeof child_stack,
                      CLONE_VM | CLONE_VFORK | SIGCHLD, s);
    int clone_err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        s->err = clone_err;
        s->stage = 3;
        return -1;
    }
    if (s->err) { /* it never ran the program: reap it here */
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
            ;
        return -1;
    }
    return pid;
}

/* the candidates for argv0: itself with a '/', else each folder of $PATH */
static char **exec_paths(const char *argv0, const struct env *e) {
    char **out;
    if (strchr(argv0, '/')) {
        out = xmalloc(2 * sizeof(char *));
        out[0] = xstrdup(argv0);
        out[1] = NULL;
        return out;
    }
    const char *path = env_get(e, "PATH");
    if (!path)
        path = "/bin:/usr/bin";
    size_t n = 1;
    for (const char *c = path; *c; c++)
        n += *c == ':';
    out = xmalloc((n + 1) * sizeof(char *));
    size_t i = 0;
    const char *start = path;
    for (;;) {
        const char *end = strchr(start, ':');
        size_t len = end ? (size_t)(end - start) : strlen(start);
        char *p = xmalloc(len + strlen(argv0) + 2);
        if (len) {
            memcpy(p, start, len);
            p[len] = '/';
            strcpy(p + len + 1, argv0);
        } else {
            strcpy(p, argv0);
        }
        out[i++] = p;
        if (!end)
            break;
        start = end + 1;
    }
    out[i] = NULL;
    return out;
}

static void free_strv(char **v) {
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

static void add_proc(struct proc *p) {
    p->next = procs;
    procs = p;
}

static struct proc *new_proc(int64_t id, double timeout, bool entrypoint) {
    struct proc *p = xmalloc(sizeof *p);
    memset(p, 0, sizeof *p);
    p->id = id;
    p->fds[0] = p->fds[1] = p->fds[2] = -1;
    p->stdin_fd = -1;
    p->timeout = timeout;
    p->deadline = timeout > 0 ? now_ms() + (int64_t)(timeout * 1000.0) : 0;
    p->entrypoint = entrypoint;
    return p;
}

static void send_pty_stderr_eof(int64_t id) {
    struct buf b = {0};
    frame_begin(&b);
    mp_map(&b, 2);
    mp_cstr(&b, "t");
    mp_cstr(&b, "sbout");
    mp_cstr(&b, "chunks");
    mp_array(&b, 1);
    mp_array(&b, 4);
    mp_int(&b, id);
    mp_int(&b, 2);
    mp_bin(&b, NULL, 0);
    mp_bool(&b, true);
    frame_end(&b);
    chan_send(&b);
    buf_free(&b);
}

struct exec_req {
    int64_t id;
    char **argv; /* NULL-terminated */
    size_t argc;
    char *workdir; /* NULL: the sandbox's */
    const struct val *env;
    double timeout; /* 0: none */
    bool pty;
    bool has_size;
    int64_t rows, cols;
    bool bad; /* a NUL byte or a bad variable name: it cannot start */
};

static void exec_pty(struct exec_req *q, struct env *e, const char *cwd) {
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC), slave = -1;
    char name[128];
    if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
        ptsname_r(master, name, sizeof name) != 0 ||
        (slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
        int err = errno;
        if (master >= 0)
            close(master);
        char *msg = NULL;
        if (asprintf(&msg, "%s: %s\n", q->argv[0], strerror(err)) < 0)
            die_oom();
        fail_start(q->id, msg, 127);
        free(msg);
        return;
    }
    if (q->has_size) {
        struct winsize ws = {(unsigned short)q->rows, (unsigned short)q->cols, 0, 0};
        ioctl(slave, TIOCSWINSZ, &ws);
    }
    if (!env_get(e, "TERM"))
        env_set(e, "TERM", 4, "xterm-256color");
    char **paths = exec_paths(q->argv[0], e);
    struct spawn s = {q->argv, e->items, paths, cwd, slave, slave, slave, true, 0, 0};
    pid_t pid = spawn(&s);
    free_strv(paths);
    close(slave);
    if (pid < 0) {
        close(master);
        char *msg = NULL;
        if (asprintf(&msg, "%s: %s\n", q->argv[0], strerror(s.err)) < 0)
            die_oom();
        fail_start(q->id, msg, 127);
        free(msg);
        return;
    }
    struct proc *p = new_proc(q->id, q->timeout, false);
    p->pid = pid;
    p->is_pty = true;
    p->fds[1] = master;
    p->stdin_fd = dup(master);
    if (p->stdin_fd >= 0) {
        fcntl(p->stdin_fd, F_SETFD, FD_CLOEXEC);
        set_nonblock(p->stdin_fd);
    }
    set_nonblock(master);
    add_proc(p);
    send_pty_stderr_eof(q->id);
}

static void do_exec(struct exec_req *q, bool entrypoint) {
    if (q->bad || q->argc == 0) {
        fail_start(q->id, q->argc ? "embedded null byte or bad variable name\n"
                                  : "an empty command\n", 127);
        return;
    }
    struct env e;
    env_copy(&e, &base_env);
    if (!env_apply(&e, q->env)) {
        env_free(&e);
        fail_start(q->id, "illegal environment variable name\n", 127);
        return;
    }
    char *cwd = q->workdir ? xstrdup(q->workdir) : current_workdir();
    if (q->pty) {
        exec_pty(q, &e, cwd);
        env_free(&e);
        free(cwd);
        return;
    }
    struct stat st;
    if (stat(cwd, &st) < 0 || !S_ISDIR(st.st_mode)) {
        char *msg = NULL;
        if (asprintf(&msg, "cd: %s: No such directory\n", cwd) < 0)
            die_oom();
        fail_start(q->id, msg, 127);
        free(msg);
        env_free(&e);
        free(cwd);
        return;
    }
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        int e2 = errno;
        for (int i = 0; i < 2; i++) {
            if (in[i] >= 0)
                close(in[i]);
            if (out[i] >= 0)
                close(out[i]);
            if (err[i] >= 0)
                close(err[i]);
        }
        char *msg = NULL;
        if (asprintf(&msg, "%s: [Errno %d] %s\n", q->argv[0], e2, strerror(e2)) < 0)
            die_oom();
        fail_start(q->id, msg, 126);
        free(msg);
        env_free(&e);
        free(cwd);
        return;
    }
    char **paths = exec_paths(q->argv[0], &e);
    struct spawn s = {q->argv, e.items, paths, cwd, in[0], out[1], err[1], false, 0, 0};
    pid_t pid = spawn(&s);
    free_strv(paths);
    if (pid < 0 && s.stage == 2 && (s.err == ENOENT || s.err == EACCES || s.err == EPERM)) {
        struct stat sh;
        if (stat(SHELL, &sh) < 0) {
            char *msg = NULL;
            if (asprintf(&msg, "%s: %s\n", q->argv[0], strerror(s.err)) < 0)
                die_oom();
            fail_start(q->id, msg, 127);
            free(msg);
            goto out;
        }
        /* the shell says what is wrong with the program, and exits 127 (or 126) */
        char **argv = xmalloc((q->argc + 4) * sizeof(char *));
        argv[0] = SHELL;
        argv[1] = "-c";
        argv[2] = "exec \"$0\" \"$@\"";
        for (size_t i = 0; i <= q->argc; i++)
            argv[3 + i] = q->argv[i];
        char *shell_paths[] = {SHELL, NULL};
        struct spawn s2 = {argv, e.items, shell_paths, cwd, in[0], out[1], err[1], false, 0, 0};
        pid = spawn(&s2);
        free(argv);
        if (pid < 0)
            s = s2;
    }
    if (pid < 0) {
        char *msg = NULL;
        if (s.stage == 1) {
            if (asprintf(&msg, "%s: [Errno %d] %s: '%s'\n", q->argv[0], s.err, strerror(s.err),
                         cwd) < 0)
                die_oom();
        } else if (asprintf(&msg, "%s: [Errno %d] %s\n", q->argv[0], s.err,
                            strerror(s.err)) < 0) {
            die_oom();
        }
        fail_start(q->id, msg, 126);
        free(msg);
        goto out;
    }
    struct proc *p = new_proc(q->id, q->timeout, entrypoint);
    p->pid = pid;
    p->stdin_fd = in[1];
    p->fds[1] = out[0];
    p->fds[2] = err[0];
    set_nonblock(in[1]);
    set_nonblock(out[0]);
    set_nonblock(err[0]);
    in[1] = out[0] = err[0] = -1;
    add_proc(p);
out:
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0)
            close(in[i]);
        if (out[i] >= 0)
            close(out[i]);
        if (err[i] >= 0)
            close(err[i]);
    }
    env_free(&e);
    free(cwd);
}

/* ---------------------------------------------------------------- stdin */

static void stdin_close(struct proc *p) {
    if (p->stdin_fd >= 0)
        close(p->stdin_fd);
    p->stdin_fd = -1;
    p->stdin_done = true;
    while (p->in_head) {
        struct chunk *c = p->in_head;
        p->in_head = c->next;
        free(c);
    }
    p->in_tail = NULL;
}

static void stdin_queue(struct proc *p, const uint8_t *data, size_t n, bool eof) {
    if (p->stdin_done || p->stdin_fd < 0)
        return; /* nobody reads it any more */
    struct chunk *c = xmalloc(sizeof *c + n);
    c->next = NULL;
    c->len = n;
    c->off = 0;
    c->eof = eof;
    memcpy(c->data, data, n);
    if (p->in_tail)
        p->in_tail->next = c;
    else
        p->in_head = c;
    p->in_tail = c;
}

/* write what it can without blocking */
static void stdin_write(struct proc *p) {
    while (p->in_head && p->stdin_fd >= 0) {
        struct chunk *c = p->in_head;
        while (c->off < c->len) {
            ssize_t n = write(p->stdin_fd, c->data + c->off, c->len - c->off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && errno == EAGAIN)
                return;
            if (n <= 0) { /* it closed its stdin, or exited */
                stdin_close(p);
                return;
            }
            c->off += (size_t)n;
        }
        if (c->eof) {
            if (p->is_pty) { /* a terminal's end of input */
                ssize_t n = write(p->stdin_fd, "\x04", 1);
                if (n < 0 && errno == EAGAIN)
                    return; /* (again later) */
            }
            stdin_close(p);
            return;
        }
        p->in_head = c->next;
        if (!p->in_head)
            p->in_tail = NULL;
        free(c);
    }
}

/* ---------------------------------------------------------------- output and exits */

static struct buf out_frame;
static size_t out_chunks;
static struct buf out_body;

static void out_reset(void) {
    out_body.len = 0;
    out_chunks = 0;
}

static void out_add(int64_t id, int stream, const uint8_t *data, size_t n, bool eof) {
    mp_array(&out_body, 4);
    mp_int(&out_body, id);
    mp_int(&out_body, stream);
    mp_bin(&out_body, data, n);
    mp_bool(&out_body, eof);
    out_chunks++;
}

static bool out_flush(void) {
    if (!out_chunks)
        return true;
    frame_begin(&out_frame);
    mp_map(&out_frame, 2);
    mp_cstr(&out_frame, "t");
    mp_cstr(&out_frame, "sbout");
    mp_cstr(&out_frame, "chunks");
    mp_array(&out_frame, out_chunks);
    buf_put(&out_frame, out_body.p, out_body.len);
    frame_end(&out_frame);
    bool ok = chan_send(&out_frame);
    out_reset();
    if (out_frame.cap > (4u << 20)) /* (a big frame's memory goes back) */
        buf_free(&out_frame);
    return ok;
}

static void close_stream(struct proc *p, int stream) {
    if (p->fds[stream] >= 0) {
        close(p->fds[stream]);
        p->fds[stream] = -1;
    }
}

/* read one ready stream (and at once its end, if it has come); the bytes taken */
static size_t read_stream(struct proc *p, int stream, uint8_t *chunk) {
    size_t size = 0;
    for (int i = 0; i < 2; i++) {
        ssize_t n = read(p->fds[stream], chunk, READ_SIZE);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            break;
        if (n <= 0) {
            close_stream(p, stream);
            out_add(p->id, stream, NULL, 0, true);
            break;
        }
        out_add(p->id, stream, chunk, (size_t)n, false);
        size += (size_t)n;
        if (n == READ_SIZE)
            break;
    }
    return size;
}

static void free_proc(struct proc *p) {
    close_stream(p, 1);
    close_stream(p, 2);
    stdin_close(p);
    free(p);
}

static void exit_code(struct proc *p, int64_t *code, char *reason, size_t size) {
    reason[0] = 0;
    if (p->timed_out) {
        *code = 124;
        snprintf(reason, size, "killed by its timeout (%gs)", p->timeout);
    } else if (WIFSIGNALED(p->status)) {
        int sig = WTERMSIG(p->status);
        *code = 128 + sig;
        const char *name = signal_name(sig);
        if (name)
            snprintf(reason, size, "killed by %s", name);
        else
            snprintf(reason, size, "killed by signal %d", sig);
    } else {
        *code = WEXITSTATUS(p->status);
    }
}

/* exits whose streams have ended (or waited long enough): SbExit, after their output */
static void report_exits(void) {
    int64_t now = now_ms();
    struct proc **link = &procs;
    while (*link) {
        struct proc *p = *link;
        bool streams_done = p->fds[1] < 0 && p->fds[2] < 0;
        if (p->exited && !p->exit_sent &&
            (streams_done || now - p->exited_at >= EXIT_AFTER_EOF_MS)) {
            int64_t code;
            char reason[128];
            exit_code(p, &code, reason, sizeof reason);
            send_exit(p->id, code, reason);
            p->exit_sent = true;
            if (p->is_pty) /* (its stdin is the terminal: closed with it) */
                stdin_close(p);
            if (p->entrypoint) { /* the sandbox ends with its entrypoint */
                kill_all();
                shutdown(chan, SHUT_RDWR);
                _exit((int)(code & 0xFF));
            }
        }
        if (p->exit_sent && p->fds[1] < 0 && p->fds[2] < 0) {
            *link = p->next;
            free_proc(p);
            continue;
        }
        link = &p->next;
    }
}

/* A terminal whose process has exited, and whose process group is gone: what is left in
 * it, then its end. (Linux says EIO at once when the last holder of the terminal's other
 * side is gone; gVisor never does: without this its output would never end.) */
static void end_terminals(uint8_t *chunk) {
    for (struct proc *p = procs; p; p = p->next) {
        if (!p->is_pty || !p->exited || p->fds[1] < 0 || p->paused[1])
            continue;
        if (killpg(p->pid, 0) == 0 || errno != ESRCH)
            continue;
        for (int i = 0; i < 64 && p->fds[1] >= 0; i++) {
            ssize_t n = read(p->fds[1], chunk, READ_SIZE);
            if (n > 0) {
                out_add(p->id, 1, chunk, (size_t)n, false);
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            close_stream(p, 1); /* its end, an error, or nothing left (EAGAIN) */
            out_add(p->id, 1, NULL, 0, true);
        }
    }
}

static void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return;
        for (struct proc *p = procs; p; p = p->next) {
            if (p->pid == pid && !p->exited) {
                p->exited = true;
                p->status = status;
                p->exited_at = now_ms();
                break;
            }
        }
    }
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
        if (entry && entry->n) {
            size_t argc;
            bool bad = false;
            char **argv = str_list(entry, &argc, &bad);
            struct exec_req q = {0};
            q.id = 1;
            q.argv = argv;
            q.argc = argc;
            q.bad = bad;
            do_exec(&q, true);
            free_strv(argv);
        }
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
    ssize_t got = recv(chan, in_buf + in_len, room, MSG_DONTWAIT);
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
        fds[n] = (struct pollfd){chan, POLLIN, 0};
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

    chan = dial_channel(g_channel, 10000);
    if (chan < 0) {
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
    if (entry && entry->n) {
        size_t argc;
        bool bad = false;
        char **argv = str_list(entry, &argc, &bad);
        struct exec_req q = {0};
        q.id = 1;
        q.argv = argv;
        q.argc = argc;
        q.bad = bad;
        do_exec(&q, true);
        free_strv(argv);
    }
    mp_free(spec);
    free(spec_data);
    send_ready();
    _exit(serve());
}
