/* msgpack for the agent's frames: the encoder writes exactly what msgspec writes for the
 * same messages (sandbox_wire.py's rules); the decoder checks every length against what
 * is left of the body before it reads or allocates. */
#include "agent.h"

#include <stdlib.h>
#include <string.h>

void buf_put(struct buf *b, const void *data, size_t n) {
    if (n == 0)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

void buf_free(struct buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static void put1(struct buf *b, uint8_t c) { buf_put(b, &c, 1); }

static void put_be(struct buf *b, uint8_t code, uint64_t v, int size) {
    uint8_t out[9];
    out[0] = code;
    for (int i = 0; i < size; i++)
        out[1 + i] = (uint8_t)(v >> (8 * (size - 1 - i)));
    buf_put(b, out, 1 + (size_t)size);
}

void mp_nil(struct buf *b) { put1(b, 0xC0); }

void mp_bool(struct buf *b, bool v) { put1(b, v ? 0xC3 : 0xC2); }

void mp_int(struct buf *b, int64_t v) {
    if (v >= 0) {
        uint64_t u = (uint64_t)v;
        if (u < 0x80)
            put1(b, (uint8_t)u);
        else if (u < 0x100)
            put_be(b, 0xCC, u, 1);
        else if (u < 0x10000)
            put_be(b, 0xCD, u, 2);
        else if (u < 0x100000000ULL)
            put_be(b, 0xCE, u, 4);
        else
            put_be(b, 0xCF, u, 8);
    } else if (v >= -32) {
        put1(b, (uint8_t)(v & 0xFF));
    } else if (v >= -0x80) {
        put_be(b, 0xD0, (uint64_t)v, 1);
    } else if (v >= -0x8000) {
        put_be(b, 0xD1, (uint64_t)v, 2);
    } else if (v >= -0x80000000LL) {
        put_be(b, 0xD2, (uint64_t)v, 4);
    } else {
        put_be(b, 0xD3, (uint64_t)v, 8);
    }
}

/* fix: the fix type's code (fix_max < 0: none); c8: the 8-bit code (0: none) */
static void head(struct buf *b, size_t n, uint8_t fix, int fix_max, uint8_t c8, uint8_t c16) {
    if (fix_max >= 0 && n <= (size_t)fix_max)
        put1(b, (uint8_t)(fix | n));
    else if (c8 && n < 0x100)
        put_be(b, c8, n, 1);
    else if (n < 0x10000)
        put_be(b, c16, n, 2);
    else
        put_be(b, (uint8_t)(c16 + 1), n, 4); /* (callers keep n under 4 GiB) */
}

void mp_str(struct buf *b, const char *s, size_t n) {
    head(b, n, 0xA0, 31, 0xD9, 0xDA);
    buf_put(b, s, n);
}

void mp_cstr(struct buf *b, const char *s) { mp_str(b, s, strlen(s)); }

void mp_bin(struct buf *b, const void *data, size_t n) {
    head(b, n, 0, -1, 0xC4, 0xC5);
    buf_put(b, data, n);
}

void mp_array(struct buf *b, size_t n) { head(b, n, 0x90, 15, 0, 0xDC); }

void mp_map(struct buf *b, size_t n) { head(b, n, 0x80, 15, 0, 0xDE); }

void frame_begin(struct buf *b) {
    b->len = 0;
    buf_put(b, "\0\0\0\0", 4);
}

void frame_end(struct buf *b) {
    size_t n = b->len - 4;
    b->p[0] = (uint8_t)(n >> 24);
    b->p[1] = (uint8_t)(n >> 16);
    b->p[2] = (uint8_t)(n >> 8);
    b->p[3] = (uint8_t)n;
}

/* ---------------------------------------------------------------- decoding */

#define MAX_DEPTH 32

struct reader {
    const uint8_t *p;
    size_t pos, len;
};

static bool take(struct reader *r, size_t n, const uint8_t **out) {
    if (n > r->len - r->pos)
        return false;
    *out = r->p + r->pos;
    r->pos += n;
    return true;
}

static uint64_t be(const uint8_t *p, int size) {
    uint64_t v = 0;
    for (int i = 0; i < size; i++)
        v = (v << 8) | p[i];
    return v;
}

/* strict UTF-8 (as Python's decoder: no overlongs, no surrogates, <= U+10FFFF) */
static bool utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (k > n - i - 1)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10FFFF ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += k + 1;
    }
    return true;
}

static void free_items(struct val *v) {
    if (v->t == V_ARR || v->t == V_MAP) {
        size_t n = v->t == V_MAP ? 2 * (size_t)v->n : v->n;
        for (size_t i = 0; i < n; i++)
            free_items(&v->u.items[i]);
        free(v->u.items);
        v->u.items = NULL;
        v->n = 0;
    }
}

static bool value(struct reader *r, struct val *out, int depth);

static bool items(struct reader *r, struct val *out, size_t count, bool map, int depth) {
    size_t n = map ? 2 * count : count;
    out->t = map ? V_MAP : V_ARR;
    out->n = 0;
    out->u.items = NULL;
    if (n > r->len - r->pos) /* each item is at least a byte: never allocate for a lie */
        return false;
    out->u.items = calloc(n ? n : 1, sizeof(struct val));
    if (!out->u.items)
        die_oom();
    out->n = (uint32_t)count;
    for (size_t i = 0; i < n; i++) {
        if (!value(r, &out->u.items[i], depth + 1))
            return false; /* (the caller frees what was made: the rest is V_NIL) */
        if (map && i % 2 == 0 && out->u.items[i].t != V_STR && out->u.items[i].t != V_INT)
            return false;
    }
    return true;
}

static bool value(struct reader *r, struct val *out, int depth) {
    const uint8_t *p;
    memset(out, 0, sizeof *out);
    if (depth > MAX_DEPTH || !take(r, 1, &p))
        return false;
    uint8_t c = p[0];
    size_t n;
    if (c < 0x80) {
        out->t = V_INT;
        out->u.i = c;
        return true;
    }
    if (c >= 0xE0) {
        out->t = V_INT;
        out->u.i = (int64_t)c - 0x100;
        return true;
    }
    if (c >= 0xA0 && c <= 0xBF) {
        n = c & 0x1F;
        goto str;
    }
    if (c >= 0x90 && c <= 0x9F)
        return items(r, out, c & 0x0F, false, depth);
    if (c >= 0x80 && c <= 0x8F)
        return items(r, out, c & 0x0F, true, depth);
    switch (c) {
    case 0xC0:
        out->t = V_NIL;
        return true;
    case 0xC2:
    case 0xC3:
        out->t = V_BOOL;
        out->u.b = c == 0xC3;
        return true;
    case 0xCA: {
        if (!take(r, 4, &p))
            return false;
        uint32_t bits = (uint32_t)be(p, 4);
        float f;
        memcpy(&f, &bits, 4);
        out->t = V_FLOAT;
        out->u.f = f;
        return true;
    }
    case 0xCB: {
        if (!take(r, 8, &p))
            return false;
        uint64_t bits = be(p, 8);
        memcpy(&out->u.f, &bits, 8);
        out->t = V_FLOAT;
        return true;
    }
    case 0xCC:
    case 0xCD:
    case 0xCE:
    case 0xCF: {
        int size = 1 << (c - 0xCC);
        if (!take(r, (size_t)size, &p))
            return false;
        uint64_t u = be(p, size);
        if (u > INT64_MAX) /* (no message has such a number) */
            return false;
        out->t = V_INT;
        out->u.i = (int64_t)u;
        return true;
    }
    case 0xD0:
    case 0xD1:
    case 0xD2:
    case 0xD3: {
        int size = 1 << (c - 0xD0);
        if (!take(r, (size_t)size, &p))
            return false;
        uint64_t u = be(p, size);
        int shift = 64 - 8 * size;
        out->t = V_INT;
        out->u.i = shift ? (int64_t)(u << shift) >> shift : (int64_t)u;
        return true;
    }
    case 0xC4:
    case 0xC5:
    case 0xC6: {
        int size = 1 << (c - 0xC4);
        if (!take(r, (size_t)size, &p))
            return false;
        n = be(p, size);
        if (!take(r, n, &p))
            return false;
        out->t = V_BIN;
        out->n = (uint32_t)n;
        out->u.s = p;
        return true;
    }
    case 0xD9:
    case 0xDA:
    case 0xDB: {
        int size = 1 << (c - 0xD9);
        if (!take(r, (size_t)size, &p))
            return false;
        n = be(p, size);
        goto str;
    }
    case 0xDC:
    case 0xDD: {
        int size = c == 0xDC ? 2 : 4;
        if (!take(r, (size_t)size, &p))
            return false;
        return items(r, out, be(p, size), false, depth);
    }
    case 0xDE:
    case 0xDF: {
        int size = c == 0xDE ? 2 : 4;
        if (!take(r, (size_t)size, &p))
            return false;
        return items(r, out, be(p, size), true, depth);
    }
    default:
        return false; /* ext types, 0xC1 */
    }
str:
    if (!take(r, n, &p) || !utf8_ok(p, n))
        return false;
    out->t = V_STR;
    out->n = (uint32_t)n;
    out->u.s = p;
    return true;
}

struct val *mp_decode(const uint8_t *data, size_t len) {
    struct reader r = {data, 0, len};
    struct val *v = xmalloc(sizeof *v);
    if (!value(&r, v, 0) || r.pos != len) {
        mp_free(v);
        return NULL;
    }
    return v;
}

void mp_free(struct val *v) {
    if (v) {
        free_items(v);
        free(v);
    }
}

bool mp_is_str(const struct val *v, const char *s) {
    size_t n = strlen(s);
    return v && v->t == V_STR && v->n == n && memcmp(v->u.s, s, n) == 0;
}

const struct val *mp_get(const struct val *map, const char *name) {
    const struct val *found = NULL;
    if (!map || map->t != V_MAP)
        return NULL;
    for (size_t i = 0; i < map->n; i++)
        if (mp_is_str(&map->u.items[2 * i], name))
            found = &map->u.items[2 * i + 1];
    return found;
}

char *mp_cstring(const struct val *v) {
    if (memchr(v->u.s, 0, v->n))
        return NULL;
    char *s = xmalloc((size_t)v->n + 1);
    memcpy(s, v->u.s, v->n);
    s[v->n] = 0;
    return s;
}
