/* A map that normalises one numeric JSON field: finds "FIELD": NUMBER in each payload by
 * scanning bytes (no JSON parser), multiplies it by SCALE exactly (decimal arithmetic on
 * integers: 21.5 x 0.1 = 2.15), and re-emits the message with the same key and headers on
 * output topic 0. A payload without the field passes unchanged.
 *
 * Parameters: field (default "t"), scale (a decimal, default "1").
 * The field is matched as the bytes "FIELD" followed by optional spaces and ':'; it can
 * also match inside a string value, which a real normaliser would rule out. */
#include "rill_guest.h"

static uint8_t field[64] = "\"t\"";
static uint32_t field_len = 3;
static int64_t scale_mantissa = 1;
static uint32_t scale_decimals = 0;

/* Parses an optionally signed decimal of at most 18 digits; returns its length, or 0. */
static uint32_t parse_decimal(const uint8_t *p, uint32_t n, int64_t *mantissa, uint32_t *decimals) {
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
static uint32_t format_decimal(uint8_t *out, int64_t m, uint32_t decimals) {
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

static int32_t param(const uint8_t **p, const uint8_t *name, uint32_t name_len, const uint8_t **value) {
    uint32_t klen = rill_u32(*p);
    const uint8_t *k = *p + 4;
    uint32_t vlen = rill_u32(k + klen);
    *value = k + klen + 4;
    *p = *value + vlen;
    if (klen != name_len) return -1;
    for (uint32_t i = 0; i < klen; i++) if (k[i] != name[i]) return -1;
    return (int32_t)vlen;
}

__attribute__((export_name("rill_init"))) int32_t rill_init(const uint8_t *p, int32_t len) {
    (void)len;
    uint32_t count = rill_u32(p);
    p += 4;
    while (count--) {
        const uint8_t *at = p, *value;
        int32_t n = param(&p, (const uint8_t *)"field", 5, &value);
        if (n >= 0) {
            if (n > 60) { rill_log("field name longer than 60 bytes", 31); return 1; }
            field[0] = '"';
            rill_copy(field + 1, value, (size_t)n);
            field[n + 1] = '"';
            field_len = (uint32_t)n + 2;
            continue;
        }
        p = at;
        n = param(&p, (const uint8_t *)"scale", 5, &value);
        if (n >= 0) {
            if (parse_decimal(value, (uint32_t)n, &scale_mantissa, &scale_decimals) != (uint32_t)n) {
                rill_log("scale is not a decimal of at most 18 digits", 43);
                return 2;
            }
            continue;
        }
        rill_log("unknown parameter (known: field, scale)", 39);
        return 3;
    }
    return 0;
}

/* Where the number of the field starts in the payload, or -1. */
static int64_t find_number(const uint8_t *s, uint32_t n) {
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

__attribute__((export_name("rill_process"))) int64_t rill_process(const uint8_t *batch, int32_t len) {
    (void)len;
    uint32_t count = rill_u32(batch);
    const uint8_t *p = batch + 4;
    /* Each output is at most its input record plus 40 bytes of a longer number. */
    uint8_t *out = rill_reserve(8 + (size_t)len + 40 * (size_t)count);
    uint8_t *o = out + 8;
    for (uint32_t i = 0; i < count; i++) {
        rill_record r;
        p = rill_read_record(p, &r);
        rill_put_u32(o, i);
        rill_put_u32(o + 4, 0);
        o += 8;
        size_t meta = (size_t)(r.meta_end - r.key_start);
        rill_copy(o, r.key_start, meta);
        o += meta;
        int64_t at = find_number(r.payload, r.payload_len);
        int64_t m;
        uint32_t d, used = 0;
        if (at >= 0) used = parse_decimal(r.payload + at, r.payload_len - (uint32_t)at, &m, &d);
        if (used == 0) {
            rill_put_u32(o, r.payload_len);
            rill_copy(o + 4, r.payload, r.payload_len);
            o += 4 + r.payload_len;
            continue;
        }
        if (m > 999999999 || m < -999999999 || scale_mantissa > 999999999 || scale_mantissa < -999999999)
            return rill_fail("the number or the scale has more than 9 significant digits");
        uint8_t *len_at = o;
        o += 4;
        rill_copy(o, r.payload, (size_t)at);
        o += at;
        o += format_decimal(o, m * scale_mantissa, d + scale_decimals);
        uint32_t rest = r.payload_len - (uint32_t)at - used;
        rill_copy(o, r.payload + at + used, rest);
        o += rest;
        rill_put_u32(len_at, (uint32_t)(o - len_at - 4));
    }
    rill_put_u32(out, 0);
    rill_put_u32(out + 4, count);
    return rill_answer(out, o);
}
