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

__attribute__((export_name("rill_init"))) int32_t rill_init(const uint8_t *p, int32_t len) {
    (void)len;
    uint32_t count = rill_u32(p);
    p += 4;
    while (count--) {
        const uint8_t *at = p, *value;
        int32_t n = rill_param(&p, (const uint8_t *)"field", 5, &value);
        if (n >= 0) {
            if (!rill_set_field(field, &field_len, value, n)) return 1;
            continue;
        }
        p = at;
        n = rill_param(&p, (const uint8_t *)"scale", 5, &value);
        if (n >= 0) {
            if (rill_parse_decimal(value, (uint32_t)n, &scale_mantissa, &scale_decimals) != (uint32_t)n) {
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
        int64_t at = rill_find_field(r.payload, r.payload_len, field, field_len);
        int64_t m;
        uint32_t d, used = 0;
        if (at >= 0) used = rill_parse_decimal(r.payload + at, r.payload_len - (uint32_t)at, &m, &d);
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
        o += rill_format_decimal(o, m * scale_mantissa, d + scale_decimals);
        uint32_t rest = r.payload_len - (uint32_t)at - used;
        rill_copy(o, r.payload + at + used, rest);
        o += rest;
        rill_put_u32(len_at, (uint32_t)(o - len_at - 4));
    }
    rill_put_u32(out, 0);
    rill_put_u32(out + 4, count);
    return rill_answer(out, o);
}
