/* An aggregate: the rolling mean of one numeric JSON field per key (per device), over
 * its last WINDOW readings. For each input whose payload has "FIELD": NUMBER it emits,
 * with the input's key, {"mean":M,"n":N} on output topic 0, where N is how many readings
 * the mean covers (at most WINDOW); an input without the field is dropped.
 *
 * Parameters: field (default "t"), window (1..64, default 10).
 * Numbers are kept exactly as integers in millionths (at most 6 decimals, |x| < 9e12);
 * the mean is rounded to the nearest millionth, halves away from zero.
 *
 * The node keeps each key's state and hands it back with every batch (guest ABI v1,
 * rill_aggregate): state = window:u32 count:u32 next:u32 value:i64[count], a ring of the
 * last readings. A state written under another window starts afresh. */
#include "rill_guest.h"

#define WINDOW_MAX 64
#define MICRO 1000000

static uint8_t field[64] = "\"t\"";
static uint32_t field_len = 3;
static uint32_t window = 10;

typedef struct {
    uint32_t count, next;
    int64_t values[WINDOW_MAX];
    int changed;
} ring;

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
        n = rill_param(&p, (const uint8_t *)"window", 6, &value);
        if (n >= 0) {
            int64_t m;
            uint32_t d;
            if (rill_parse_decimal(value, (uint32_t)n, &m, &d) != (uint32_t)n || d != 0 || m < 1 || m > WINDOW_MAX) {
                rill_log("window is not a whole number from 1 to 64", 41);
                return 2;
            }
            window = (uint32_t)m;
            continue;
        }
        rill_log("unknown parameter (known: field, window)", 40);
        return 3;
    }
    return 0;
}

/* Reads an encoded length (-1: absent) and steps over it and its bytes. */
static const uint8_t *skip_optional(const uint8_t *p, int32_t *len) {
    *len = (int32_t)rill_u32(p);
    return p + 4 + (*len > 0 ? *len : 0);
}

/* Loads a key's state (len -1: none); a state of another window starts afresh. */
static void load(ring *r, const uint8_t *s, int32_t len) {
    r->count = r->next = 0;
    r->changed = 0;
    if (len < 12 || rill_u32(s) != window) return;
    uint32_t count = rill_u32(s + 4), next = rill_u32(s + 8);
    if (count > window || next >= window || (uint32_t)len != 12 + 8 * count) return;
    r->count = count;
    r->next = next;
    for (uint32_t i = 0; i < count; i++) r->values[i] = (int64_t)rill_u64(s + 12 + 8 * i);
}

/* The reading in millionths, or 0 with *ok = 0 when it has more than 6 decimals or is
 * too large. */
static int64_t micros(int64_t m, uint32_t d, int *ok) {
    *ok = d <= 6 && m < 9000000000000LL && m > -9000000000000LL;
    if (!*ok) return 0;
    while (d < 6) { m *= 10; d++; }
    return m;
}

__attribute__((export_name("rill_aggregate"))) int64_t rill_aggregate(const uint8_t *batch, int32_t len) {
    uint32_t slots = rill_u32(batch);
    const uint8_t *p = batch + 4;
    ring *rings = (ring *)rill_reserve(sizeof(ring) * (slots ? slots : 1));
    for (uint32_t s = 0; s < slots; s++) {
        int32_t key_len, state_len;
        p = skip_optional(p, &key_len);
        const uint8_t *state = p + 4;
        p = skip_optional(p, &state_len);
        load(&rings[s], state, state_len);
    }
    uint32_t count = rill_u32(p);
    p += 4;
    /* Each output: 8 bytes of indexes, the input's key, no headers, a payload of at most
     * 64 bytes; then each state. */
    uint8_t *out = rill_reserve(12 + (size_t)len + 80 * (size_t)count + (12 + 12 + 8 * WINDOW_MAX) * (size_t)slots);
    uint8_t *o = out + 8;
    uint32_t emitted = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t slot = rill_u32(p);
        rill_record rec;
        p = rill_read_record(p + 4, &rec);
        if (slot >= slots) return rill_fail("a record names a slot past the batch's keys");
        int64_t at = rill_find_field(rec.payload, rec.payload_len, field, field_len);
        int64_t m;
        uint32_t d, used = 0;
        if (at >= 0) used = rill_parse_decimal(rec.payload + at, rec.payload_len - (uint32_t)at, &m, &d);
        if (used == 0) continue;
        int ok;
        int64_t x = micros(m, d, &ok);
        if (!ok) return rill_fail("a reading has more than 6 decimals or 13 integer digits");
        ring *r = &rings[slot];
        r->values[r->next] = x;
        r->next = (r->next + 1) % window;
        if (r->count < window) r->count++;
        r->changed = 1;
        int64_t sum = 0;
        for (uint32_t k = 0; k < r->count; k++) sum += r->values[k];
        int64_t n = (int64_t)r->count;
        int64_t mean = (sum >= 0 ? sum + n / 2 : sum - n / 2) / n;
        rill_put_u32(o, i);
        rill_put_u32(o + 4, 0);
        o += 8;
        int32_t key_len = (int32_t)rill_u32(rec.key_start);
        size_t key_bytes = 4 + (key_len > 0 ? (size_t)key_len : 0);
        rill_copy(o, rec.key_start, key_bytes);
        o += key_bytes;
        rill_put_u32(o, 0); /* no headers */
        o += 4;
        uint8_t *len_at = o;
        o += 4;
        rill_copy(o, (const uint8_t *)"{\"mean\":", 8);
        o += 8;
        o += rill_format_decimal(o, mean, 6);
        rill_copy(o, (const uint8_t *)",\"n\":", 5);
        o += 5;
        o += rill_format_decimal(o, n, 0);
        *o++ = '}';
        rill_put_u32(len_at, (uint32_t)(o - len_at - 4));
        emitted++;
    }
    rill_put_u32(out, 0);
    rill_put_u32(out + 4, emitted);
    uint8_t *changed_at = o;
    o += 4;
    uint32_t changed = 0;
    for (uint32_t s = 0; s < slots; s++) {
        ring *r = &rings[s];
        if (!r->changed) continue;
        rill_put_u32(o, s);
        rill_put_u32(o + 4, 12 + 8 * r->count);
        rill_put_u32(o + 8, window);
        rill_put_u32(o + 12, r->count);
        rill_put_u32(o + 16, r->next);
        o += 20;
        for (uint32_t k = 0; k < r->count; k++) {
            uint64_t v = (uint64_t)r->values[k];
            rill_put_u32(o, (uint32_t)v);
            rill_put_u32(o + 4, (uint32_t)(v >> 32));
            o += 8;
        }
        changed++;
    }
    rill_put_u32(changed_at, changed);
    return rill_answer(out, o);
}
