//! Lowercase hexadecimal, the one spelling of bytes in names, ids and tokens.

/// `bytes` as lowercase hex digits, two per byte.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from_digit(u32::from(b >> 4), 16).expect("a nibble"));
        s.push(char::from_digit(u32::from(b & 0xf), 16).expect("a nibble"));
    }
    s
}

/// The bytes `s` spells (two hex digits per byte, either case); `None` for anything else.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        assert_eq!(encode(&[0x00, 0x5a, 0xff]), "005aff");
        assert_eq!(decode("005aFF"), Some(vec![0x00, 0x5a, 0xff]));
        for bad in ["0", "+f", "zz", "0g"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
