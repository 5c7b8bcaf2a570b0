/* File operations (SbFile), each on a thread of its own: the same results and errors as
 * sandbox_agent.file_op (error "<path>: <strerror>", error_kind by errno). */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_ENTRIES 100000
#define MAX_ERROR 4000

struct result {
    uint8_t *data;
    size_t data_len;
    int64_t size;
    bool is_dir;
    char **entries;
    size_t n_entries;
    char *error;       /* NULL: none */
    const char *kind;  /* with error */
};

static const char *errno_kind(int e) {
    switch (e) {
    case ENOENT:
        return "not_found";
    case EEXIST:
        return "exists";
    case EISDIR:
        return "is_dir";
    case ENOTDIR:
        return "not_dir";
    case EACCES:
    case EPERM:
    case EROFS:
        return "permission";
    case ENOTEMPTY:
        return "not_empty";
    default:
        return "other";
    }
}

/* at most `max` bytes of `s`, cut at a character's start */
static size_t utf8_cut(const char *s, size_t n, size_t max) {
    if (n <= max)
        return n;
    while (max > 0 && ((unsigned char)s[max] & 0xC0) == 0x80)
        max--;
    return max;
}

static void fail(struct result *res, const char *path, int e, const char *text) {
    char *msg = NULL;
    if (asprintf(&msg, "%s: %s", path, text ? text : strerror(e)) < 0)
        die_oom();
    msg[utf8_cut(msg, strlen(msg), MAX_ERROR)] = 0;
    res->error = msg;
    res->kind = errno_kind(e);
}

static char *join(const char *workdir, const char *path) {
    char *out = NULL;
    int r;
    if (path[0] == '/')
        r = asprintf(&out, "%s", path);
    else if (workdir[0] && workdir[strlen(workdir) - 1] == '/')
        r = asprintf(&out, "%s%s", workdir, path);
    else
        r = asprintf(&out, "%s/%s", workdir, path);
    if (r < 0)
        die_oom();
    return out;
}

static int op_read(const char *path, const struct file_req *q, struct result *res) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) { /* (as Python's open) */
        close(fd);
        return EISDIR;
    }
    if (lseek(fd, (off_t)q->offset, SEEK_SET) < 0) {
        int e = errno;
        close(fd);
        return e;
    }
    size_t want = q->length > 0 ? (size_t)q->length : 0, got = 0;
    size_t cap = want < (64u << 10) ? want : (64u << 10); /* (grown as it reads) */
    res->data = xmalloc(cap ? cap : 1);
    while (got < want) {
        if (got == cap) {
            cap = cap * 2 < want ? cap * 2 : want;
            res->data = xrealloc(res->data, cap);
        }
        ssize_t n = read(fd, res->data + got, cap - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            return e;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    res->data_len = got;
    close(fd);
    return 0;
}

static int op_write(const char *path, const struct file_req *q, struct result *res) {
    int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (q->truncate ? O_TRUNC : 0);
    if (q->append)
        flags |= O_APPEND;
    int fd = open(path, flags, 0644);
    if (fd < 0)
        return errno;
    size_t done = 0;
    int64_t at = q->offset;
    while (done < q->data_len) {
        ssize_t n = q->append ? write(fd, q->data + done, q->data_len - done)
                              : pwrite(fd, q->data + done, q->data_len - done, (off_t)at);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            return e;
        }
        done += (size_t)n;
        at += n;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return e;
    }
    res->size = st.st_size;
    close(fd);
    return 0;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* a name that is not UTF-8 has its bad bytes as '?' (msgpack strings are UTF-8) */
static void utf8_fix(char *s) {
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        int k = *p < 0x80 ? 0 : *p >= 0xC2 && *p <= 0xDF ? 1 : *p >= 0xE0 && *p <= 0xEF ? 2
                : *p >= 0xF0 && *p <= 0xF4 ? 3 : -1;
        bool ok = k >= 0;
        for (int j = 1; ok && j <= k; j++)
            ok = (p[j] & 0xC0) == 0x80;
        if (ok && k == 2) {
            unsigned cp = ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
            ok = cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF);
        } else if (ok && k == 3) {
            unsigned cp = ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) |
                          ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
            ok = cp >= 0x10000 && cp <= 0x10FFFF;
        }
        if (!ok) {
            *p++ = '?';
            continue;
        }
        p += k + 1;
    }
}

static int op_ls(const char *path, struct result *res) {
    DIR *d = opendir(path);
    if (!d)
        return errno;
    size_t cap = 64;
    res->entries = xmalloc(cap * sizeof(char *));
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        if (res->n_entries == cap) {
            cap *= 2;
            res->entries = xrealloc(res->entries, cap * sizeof(char *));
        }
        char *name = xstrdup(e->d_name);
        utf8_fix(name);
        res->entries[res->n_entries++] = name;
    }
    int err = errno;
    closedir(d);
    if (err)
        return err;
    qsort(res->entries, res->n_entries, sizeof(char *), cmp_names);
    while (res->n_entries > MAX_ENTRIES)
        free(res->entries[--res->n_entries]);
    res->is_dir = true;
    return 0;
}

static int makedirs(char *path) {
    struct stat st;
    if (mkdir(path, 0777) == 0)
        return 0;
    if (errno == EEXIST) /* (exist_ok: a folder; anything else is an error) */
        return stat(path, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : EEXIST;
    if (errno != ENOENT)
        return errno;
    char *slash = strrchr(path, '/');
    while (slash && slash > path && slash[-1] == '/')
        slash--;
    if (!slash || slash == path)
        return ENOENT;
    *slash = 0;
    int e = makedirs(path);
    *slash = '/';
    if (e && e != EEXIST)
        return e;
    if (mkdir(path, 0777) == 0)
        return 0;
    if (errno == EEXIST)
        return stat(path, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : EEXIST;
    return errno;
}

/* everything in the folder `fd` (which it closes), then nothing follows links */
static int rmtree_fd(int fd, int depth) {
    if (depth > 512) {
        close(fd);
        return ELOOP;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return e;
    }
    int err = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno != ENOENT && !err)
                err = errno;
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            int sub = openat(dirfd(d), e->d_name,
                             O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            int r = sub < 0 ? errno : rmtree_fd(sub, depth + 1);
            if (!r && unlinkat(dirfd(d), e->d_name, AT_REMOVEDIR) < 0)
                r = errno;
            if (r && r != ENOENT && !err)
                err = r;
        } else if (unlinkat(dirfd(d), e->d_name, 0) < 0 && errno != ENOENT && !err) {
            err = errno;
        }
    }
    closedir(d);
    return err;
}

static int op_rm(const char *path, bool recursive) {
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        if (!recursive)
            return rmdir(path) < 0 ? errno : 0;
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            return errno;
        int e = rmtree_fd(fd, 0);
        if (e)
            return e;
        return rmdir(path) < 0 ? errno : 0;
    }
    return unlink(path) < 0 ? errno : 0;
}

static void run(struct file_req *q, struct result *res) {
    if (q->path_has_nul) {
        fail(res, "?", EINVAL, "embedded null byte");
        return;
    }
    char *workdir = current_workdir();
    char *path = join(workdir, q->path);
    free(workdir);
    int e = 0;
    struct stat st;
    const char *op = q->op;
    if (!strcmp(op, "read")) {
        e = op_read(path, q, res);
    } else if (!strcmp(op, "write")) {
        e = op_write(path, q, res);
    } else if (!strcmp(op, "sync")) {
        sync();
    } else if (!strcmp(op, "stat")) {
        if (stat(path, &st) < 0) {
            e = errno;
        } else {
            res->size = st.st_size;
            res->is_dir = S_ISDIR(st.st_mode);
        }
    } else if (!strcmp(op, "ls")) {
        e = op_ls(path, res);
    } else if (!strcmp(op, "mkdir")) {
        if (q->recursive)
            e = makedirs(path);
        else
            e = mkdir(path, 0777) < 0 ? errno : 0;
        res->is_dir = true;
    } else if (!strcmp(op, "rm")) {
        e = op_rm(path, q->recursive);
    } else {
        char *text = NULL;
        if (asprintf(&text, "unknown file operation %s", op) < 0)
            die_oom();
        fail(res, q->path, EINVAL, text);
        free(text);
    }
    if (e)
        fail(res, q->path, e, NULL);
    free(path);
}

static void send_result(int64_t req_id, struct result *res) {
    struct buf b = {0};
    frame_begin(&b);
    mp_map(&b, 3);
    mp_cstr(&b, "t");
    mp_cstr(&b, "sbfileres");
    mp_cstr(&b, "req_id");
    mp_int(&b, req_id);
    mp_cstr(&b, "result");
    mp_map(&b, 6);
    bool err = res->error != NULL; /* an error carries nothing else */
    mp_cstr(&b, "data");
    mp_bin(&b, err ? NULL : res->data, err ? 0 : res->data_len);
    mp_cstr(&b, "size");
    mp_int(&b, err ? 0 : res->size);
    mp_cstr(&b, "is_dir");
    mp_bool(&b, err ? false : res->is_dir);
    mp_cstr(&b, "entries");
    size_t n = err ? 0 : res->n_entries;
    mp_array(&b, n);
    for (size_t i = 0; i < n; i++)
        mp_cstr(&b, res->entries[i]);
    mp_cstr(&b, "error");
    if (err)
        mp_cstr(&b, res->error);
    else
        mp_nil(&b);
    mp_cstr(&b, "error_kind");
    if (err)
        mp_cstr(&b, res->kind);
    else
        mp_nil(&b);
    frame_end(&b);
    chan_send(&b);
    buf_free(&b);
}

static void *file_thread(void *arg) {
    struct file_req *q = arg;
    struct result res = {0};
    run(q, &res);
    send_result(q->req_id, &res);
    free(res.data);
    for (size_t i = 0; i < res.n_entries; i++)
        free(res.entries[i]);
    free(res.entries);
    free(res.error);
    free(q->op);
    free(q->path);
    free(q->data);
    free(q);
    return NULL;
}

void file_start(struct file_req *req) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 1 << 20);
    if (pthread_create(&t, &attr, file_thread, req) != 0)
        file_thread(req); /* (no thread: in line, rather than no answer) */
    pthread_attr_destroy(&attr);
}
