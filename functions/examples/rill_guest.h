/* Helpers for rill guests written in C (guest ABI v1: node/src/functions/abi.rs).
 * Freestanding: no libc. Build with clang --target=wasm32 (see functions/build-examples). */
#ifndef RILL_GUEST_H
#define RILL_GUEST_H
#include <stddef.h>
#include <stdint.h>

extern unsigned char __heap_base;
__attribute__((import_module("rill"), import_name("log"))) void rill_log(const char *ptr, int32_t len);

/* One input record, pointing into the batch. */
typedef struct {
    uint64_t offset, publish_time_ms;
    const uint8_t *key_start; /* the key as encoded (length and bytes), to copy as is */
    const uint8_t *payload;
    uint32_t payload_len;
    const uint8_t *end; /* one past the record */
    const uint8_t *meta_end; /* one past the headers: key_start..meta_end is key and headers */
} rill_record;

static inline uint32_t rill_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void rill_put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

static inline uint64_t rill_u64(const uint8_t *p) {
    return (uint64_t)rill_u32(p) | (uint64_t)rill_u32(p + 4) << 32;
}

/* Reads the record at p. */
static inline const uint8_t *rill_read_record(const uint8_t *p, rill_record *r) {
    r->offset = rill_u64(p);
    r->publish_time_ms = rill_u64(p + 8);
    p += 16;
    r->key_start = p;
    int32_t key_len = (int32_t)rill_u32(p);
    p += 4;
    if (key_len > 0) p += key_len;
    uint32_t headers = rill_u32(p);
    p += 4;
    while (headers--) {
        p += 4 + rill_u32(p);
        p += 4 + rill_u32(p);
    }
    r->meta_end = p;
    r->payload_len = rill_u32(p);
    r->payload = p + 4;
    r->end = r->payload + r->payload_len;
    return r->end;
}

static inline void rill_copy(uint8_t *to, const uint8_t *from, size_t n) {
    while (n--) *to++ = *from++;
}

/* A bump heap from __heap_base, reset by rill_alloc (the host has read the last answer
 * before it writes the next batch). */
static uint8_t *rill_heap_top;

static inline uint8_t *rill_reserve(size_t n) {
    uint8_t *p = rill_heap_top;
    size_t need = (size_t)(p + n);
    size_t have = __builtin_wasm_memory_size(0) * 65536;
    if (need > have) {
        size_t pages = (need - have + 65535) / 65536;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) __builtin_trap();
    }
    rill_heap_top = p + n;
    return p;
}

__attribute__((export_name("rill_alloc"))) uint8_t *rill_alloc(int32_t len) {
    rill_heap_top = &__heap_base;
    return rill_reserve((size_t)len);
}

static inline int64_t rill_answer(const uint8_t *start, const uint8_t *end) {
    return (int64_t)((uint64_t)(uintptr_t)start << 32 | (uint64_t)(end - start));
}

/* A failed batch: status 1 and the reason. */
static inline int64_t rill_fail(const char *why) {
    size_t n = 0;
    while (why[n]) n++;
    uint8_t *out = rill_reserve(4 + n);
    rill_put_u32(out, 1);
    rill_copy(out + 4, (const uint8_t *)why, n);
    return rill_answer(out, out + 4 + n);
}

/* Parses an optionally signed decimal of at most 18 digits; returns its length, or 0. */
static inline uint32_t rill_parse_decimal(const uint8_t *p, uint32_t n, int64_t *mantissa, uint32_t *decimals) {
    uint32_t i = 0, digits = 0, dec = 0;
    int neg = 0, dot = 0;
    int64_t m = 0;
    if (i < n && p[i] == '-') { neg = 1; i++; }
    for (; i < n; i++) {
        if (p[i] >= '0' && p[i] <= '9') {
            if (++digits > 18) return 0;
            m = m * 10 + (p[i] - '0');
            if (dot) dec++;
        } else if (p[i] == '.' && !dot) {
            dot = 1;
        } else {
            break;
        }
    }
    if (digits == 0) return 0;
    *mantissa = neg ? -m : m;
    *decimals = dec;
    return i;
}

/* Writes mantissa x 10^-decimals without trailing zeros; returns the length. */
static inline uint32_t rill_format_decimal(uint8_t *out, int64_t m, uint32_t decimals) {
    while (decimals > 0 && m % 10 == 0) { m /= 10; decimals--; }
    uint8_t digits[40];
    uint32_t n = 0, len = 0;
    uint64_t u = m < 0 ? (uint64_t)(-(m + 1)) + 1 : (uint64_t)m;
    do { digits[n++] = (uint8_t)('0' + u % 10); u /= 10; } while (u > 0);
    while (n <= decimals) digits[n++] = '0';
    if (m < 0) out[len++] = '-';
    while (n > 0) {
        if (n == decimals) out[len++] = '.';
        out[len++] = digits[--n];
    }
    return len;
}

/* Reads the parameter at *p (moving *p past it): the value's length if its name is
 * `name`, else -1. */
static inline int32_t rill_param(const uint8_t **p, const uint8_t *name, uint32_t name_len, const uint8_t **value) {
    uint32_t klen = rill_u32(*p);
    const uint8_t *k = *p + 4;
    uint32_t vlen = rill_u32(k + klen);
    *value = k + klen + 4;
    *p = *value + vlen;
    if (klen != name_len) return -1;
    for (uint32_t i = 0; i < klen; i++) if (k[i] != name[i]) return -1;
    return (int32_t)vlen;
}

/* Sets field (room for 64 bytes) to the JSON key `"NAME"` for the parameter value NAME of
 * n bytes; 0 (and a log line) when NAME is longer than 60 bytes. */
static inline int rill_set_field(uint8_t *field, uint32_t *field_len, const uint8_t *name, int32_t n) {
    if (n > 60) {
        rill_log("field name longer than 60 bytes", 31);
        return 0;
    }
    field[0] = '"';
    rill_copy(field + 1, name, (size_t)n);
    field[n + 1] = '"';
    *field_len = (uint32_t)n + 2;
    return 1;
}

/* Where the value of `field` (quoted, as it appears in JSON) starts in the payload s, or
 * -1: the bytes of field, optional spaces, ':' and optional spaces. It can also match
 * inside a string value, which a real parser would rule out. */
static inline int64_t rill_find_field(const uint8_t *s, uint32_t n, const uint8_t *field, uint32_t field_len) {
    for (uint32_t i = 0; i + field_len <= n; i++) {
        uint32_t j = 0;
        while (j < field_len && s[i + j] == field[j]) j++;
        if (j < field_len) continue;
        uint32_t k = i + field_len;
        while (k < n && s[k] == ' ') k++;
        if (k >= n || s[k] != ':') continue;
        k++;
        while (k < n && s[k] == ' ') k++;
        return k;
    }
    return -1;
}

#endif
