/* The native sandbox agent: the same behaviour and the same frames as the Python one
 * (strato/container/sandbox_agent.py), as one static binary. See main.c. */
#ifndef STRATO_AGENT_H
#define STRATO_AGENT_H

#define _GNU_SOURCE
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- wire.c: msgpack */

struct buf {
    uint8_t *p;
    size_t len, cap;
};

void buf_put(struct buf *b, const void *data, size_t n);
void buf_free(struct buf *b);

void mp_nil(struct buf *b);
void mp_bool(struct buf *b, bool v);
void mp_int(struct buf *b, int64_t v);
void mp_str(struct buf *b, const char *s, size_t n);
void mp_cstr(struct buf *b, const char *s);
void mp_bin(struct buf *b, const void *data, size_t n);
void mp_array(struct buf *b, size_t n);
void mp_map(struct buf *b, size_t n);
/* a frame: frame_begin reserves the length header, frame_end fills it in */
void frame_begin(struct buf *b);
void frame_end(struct buf *b);

enum vtype { V_NIL, V_BOOL, V_INT, V_FLOAT, V_STR, V_BIN, V_ARR, V_MAP };

struct val {
    enum vtype t;
    uint32_t n;            /* STR/BIN: bytes; ARR: items; MAP: pairs */
    union {
        bool b;
        int64_t i;
        double f;
        const uint8_t *s;  /* STR/BIN: into the decoded body */
        struct val *items; /* ARR: n items; MAP: 2n (key, value) */
    } u;
};

/* Decode a whole msgpack body (trailing bytes, truncation, invalid UTF-8, unsupported
 * types, nesting deeper than 32, map keys other than str/int: NULL). The values point
 * into `data`, which must outlive them. */
struct val *mp_decode(const uint8_t *data, size_t len);
void mp_free(struct val *v);
/* the value of key `name` in a map (the last one), or NULL */
const struct val *mp_get(const struct val *map, const char *name);
bool mp_is_str(const struct val *v, const char *s);
/* a STR as a fresh NUL-terminated string; NULL if it holds a NUL byte */
char *mp_cstring(const struct val *v);

/* ---------------------------------------------------------------- main.c */

#define MAX_BODY (64u << 20) /* a frame from the control plane at most this long */

extern pthread_mutex_t send_lock;
extern const char *g_channel, *g_container_id;
extern char *g_token;

/* send a whole frame on the channel (under send_lock); false on an error */
bool chan_send(struct buf *frame);
/* the sandbox's working directory (a fresh copy) */
char *current_workdir(void);
void *xmalloc(size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
void die_oom(void);

extern int g_chan;
int64_t now_ms(void); /* monotonic */

/* ---------------------------------------------------------------- proc.c */

#define READ_SIZE (64 << 10)
#define FRAME_BYTES (1 << 20)  /* an output frame carries at most about this much */
#define EXIT_AFTER_EOF_MS 1000 /* a process's exit waits this long for its streams' end */

struct env {
    char **items; /* "NAME=value", owned */
    size_t n, cap;
};

extern struct env base_env; /* what every process gets (then its exec's own) */
void env_set(struct env *e, const char *name, size_t name_len, const char *value);
const char *env_get(const struct env *e, const char *name);
bool env_is_map(const struct val *map);
bool env_apply(struct env *e, const struct val *map);

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

extern struct proc *procs;
struct proc *find_proc(int64_t id);
void kill_group(struct proc *p);
void kill_all(void);
void free_strv(char **v);

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

void do_exec(struct exec_req *q, bool entrypoint);
void stdin_queue(struct proc *p, const uint8_t *data, size_t n, bool eof);
void stdin_write(struct proc *p);
/* read one ready stream into the output frame; the bytes taken */
size_t read_stream(struct proc *p, int stream, uint8_t *chunk);
bool out_flush(void);
void end_terminals(uint8_t *chunk);
void report_exits(void);
void reap(void);

/* ---------------------------------------------------------------- files.c */

struct file_req {
    int64_t req_id;
    char *op, *path;
    int64_t offset, length;
    uint8_t *data;
    size_t data_len;
    bool append, truncate, recursive;
    bool path_has_nul;
};

/* runs the request on a thread of its own (a FIFO must not stall the channel) */
void file_start(struct file_req *req);

/* ---------------------------------------------------------------- tunnel.c */

/* connect to a channel address (unix:/path or tcp:host:port), -1 with errno */
int dial_channel(const char *address, int timeout_ms);
void tunnel_start(int64_t conn_id, int64_t port);

#endif
