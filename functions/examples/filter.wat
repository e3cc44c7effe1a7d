;; A filter: keeps every record whose payload is not empty and does not start with '#'
;; (comment lines from a gateway), unchanged, on the function's first output topic.
;; Guest ABI v1 (node/src/functions/abi.rs). Rebuild: functions/build-examples.
(module
  (import "rill" "log" (func $log (param i32 i32)))
  (memory (export "memory") 2)
  ;; Batches are written at 64 KiB; the answer goes right after the batch. An answer is
  ;; never larger than its batch plus 4 bytes (an output record is no larger than its
  ;; input record, and the counts take 8 bytes instead of 4).
  (global $base i32 (i32.const 65536))

  ;; Room for a batch of `len` bytes and its answer.
  (func (export "rill_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need (i32.add (global.get $base) (i32.add (i32.mul (local.get $len) (i32.const 2)) (i32.const 16))))
    (if (i32.gt_u (local.get $need) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow (i32.sub (i32.div_u (i32.add (local.get $need) (i32.const 65535)) (i32.const 65536)) (memory.size)))
              (i32.const -1))
          (then unreachable))))
    (global.get $base))

  (func (export "rill_process") (param $ptr i32) (param $len i32) (result i64)
    (local $count i32) (local $i i32) (local $p i32) (local $out i32) (local $o i32) (local $n i32)
    (local $kstart i32) (local $klen i32) (local $h i32) (local $plen i32) (local $pstart i32)
    (local.set $count (i32.load (local.get $ptr)))
    (local.set $p (i32.add (local.get $ptr) (i32.const 4)))
    (local.set $out (i32.add (local.get $ptr) (local.get $len)))
    (local.set $o (i32.add (local.get $out) (i32.const 8)))
    (block $done
      (loop $records
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        ;; offset and publish time
        (local.set $p (i32.add (local.get $p) (i32.const 16)))
        ;; key
        (local.set $kstart (local.get $p))
        (local.set $klen (i32.load (local.get $p)))
        (local.set $p (i32.add (local.get $p) (i32.const 4)))
        (if (i32.ne (local.get $klen) (i32.const -1))
          (then (local.set $p (i32.add (local.get $p) (local.get $klen)))))
        ;; headers
        (local.set $h (i32.load (local.get $p)))
        (local.set $p (i32.add (local.get $p) (i32.const 4)))
        (block $hdone
          (loop $headers
            (br_if $hdone (i32.eqz (local.get $h)))
            (local.set $p (i32.add (local.get $p) (i32.add (i32.const 4) (i32.load (local.get $p)))))
            (local.set $p (i32.add (local.get $p) (i32.add (i32.const 4) (i32.load (local.get $p)))))
            (local.set $h (i32.sub (local.get $h) (i32.const 1)))
            (br $headers)))
        ;; payload
        (local.set $plen (i32.load (local.get $p)))
        (local.set $pstart (i32.add (local.get $p) (i32.const 4)))
        (local.set $p (i32.add (local.get $pstart) (local.get $plen)))
        (if (i32.and
              (i32.gt_u (local.get $plen) (i32.const 0))
              (i32.ne (i32.load8_u (local.get $pstart)) (i32.const 35)))
          (then
            ;; output: input index, topic 0, then key, headers and payload as they came
            (i32.store (local.get $o) (local.get $i))
            (i32.store (i32.add (local.get $o) (i32.const 4)) (i32.const 0))
            (memory.copy (i32.add (local.get $o) (i32.const 8)) (local.get $kstart)
                         (i32.sub (local.get $p) (local.get $kstart)))
            (local.set $o (i32.add (local.get $o) (i32.add (i32.const 8) (i32.sub (local.get $p) (local.get $kstart)))))
            (local.set $n (i32.add (local.get $n) (i32.const 1)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $records)))
    (i32.store (local.get $out) (i32.const 0))
    (i32.store (i32.add (local.get $out) (i32.const 4)) (local.get $n))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
      (i64.extend_i32_u (i32.sub (local.get $o) (local.get $out))))))
