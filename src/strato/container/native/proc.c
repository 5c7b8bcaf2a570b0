/* Processes: the environment they get, their start (clone with CLONE_VM | CLONE_VFORK,
 * a session each, a terminal as the controlling one), stdin written without blocking,
 * output batched into SbOutput frames, exits reported after their output. All of it runs
 * on the event loop's thread (main.c). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define SHELL "/bin/sh"

/* ---------------------------------------------------------------- the environment */


struct env base_env;

void env_set(struct env *e, const char *name, size_t name_len, const char *value) {
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

const char *env_get(const struct env *e, const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; i < e->n; i++)
        if (!strncmp(e->items[i], name, n) && e->items[i][n] == '=')
            return e->items[i] + n + 1;
    return NULL;
}

/* whether `map` is absent or a msgpack {str: str} */
bool env_is_map(const struct val *map) {
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
bool env_apply(struct env *e, const struct val *map) {
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



struct proc *procs;

struct proc *find_proc(int64_t id) {
    for (struct proc *p = procs; p; p = p->next)
        if (p->id == id)
            return p;
    return NULL;
}

static void set_nonblock(int fd) {
    int one = 1;
    ioctl(fd, FIONBIO, &one);
}

void kill_group(struct proc *p) {
    if (p->pid > 0 && !p->exited && killpg(p->pid, SIGKILL) < 0)
        kill(p->pid, SIGKILL);
}

void kill_all(void) {
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

/* an SbOutput frame's head, before its `chunks` chunks (each an array of 4) */
static void sbout_begin(struct buf *b, size_t chunks) {
    frame_begin(b);
    mp_map(b, 2);
    mp_cstr(b, "t");
    mp_cstr(b, "sbout");
    mp_cstr(b, "chunks");
    mp_array(b, chunks);
}

/* one SbChunk (array_like: pid, stream, data, eof) */
static void sbout_chunk(struct buf *b, int64_t id, int stream, const void *data, size_t n,
                        bool eof) {
    mp_array(b, 4);
    mp_int(b, id);
    mp_int(b, stream);
    mp_bin(b, data, n);
    mp_bool(b, eof);
}

/* the start failed: its stdout ends, stderr says why, and it exits with `code` */
static void fail_start(int64_t id, const char *message, int code) {
    struct buf b = {0};
    sbout_begin(&b, 2);
    sbout_chunk(&b, id, 1, NULL, 0, true);
    sbout_chunk(&b, id, 2, message, strlen(message), true);
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

void free_strv(char **v) {
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
    sbout_begin(&b, 1);
    sbout_chunk(&b, id, 2, NULL, 0, true);
    frame_end(&b);
    chan_send(&b);
    buf_free(&b);
}


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

void do_exec(struct exec_req *q, bool entrypoint) {
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

void stdin_queue(struct proc *p, const uint8_t *data, size_t n, bool eof) {
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
void stdin_write(struct proc *p) {
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
    sbout_chunk(&out_body, id, stream, data, n, eof);
    out_chunks++;
}

bool out_flush(void) {
    if (!out_chunks)
        return true;
    sbout_begin(&out_frame, out_chunks);
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
size_t read_stream(struct proc *p, int stream, uint8_t *chunk) {
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
void report_exits(void) {
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
                shutdown(g_chan, SHUT_RDWR);
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
void end_terminals(uint8_t *chunk) {
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

void reap(void) {
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
