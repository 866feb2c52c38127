//! The JSON Canonicalization Scheme (RFC 8785): the one serialization of a
//! JSON value that Object Integrity Proofs (`eddsa-jcs-2022`) hash. Object
//! members sorted by their names' UTF-16 code units, no whitespace, strings
//! with only the escapes JSON requires, numbers as ECMAScript writes an
//! IEEE 754 double.
use serde_json::Value;

use crate::CoreError;

/// The canonical form of `v`. Refuses numbers that are not finite doubles
/// (serde_json has none, but an `f64` may come from elsewhere).
pub fn canonicalize(v: &Value) -> Result<String, CoreError> {
    let mut out = String::with_capacity(256);
    write_value(&mut out, v)?;
    Ok(out)
}

fn write_value(out: &mut String, v: &Value) -> Result<(), CoreError> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            let f = n
                .as_f64()
                .ok_or_else(|| jcs_error("a number that is not a double"))?;
            write_number(out, f)?;
        }
        Value::String(s) => write_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item)?;
            }
            out.push(']');
        }
        Value::Object(o) => {
            let mut members: Vec<(&String, &Value)> = o.iter().collect();
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (k, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_value(out, item)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn jcs_error(what: &str) -> CoreError {
    CoreError::InvalidProof(format!("cannot canonicalize {what}"))
}

/// A string as RFC 8785 §3.2.2.2 writes it: `"` and `\` escaped, the
/// control characters as `\b \t \n \f \r` or `\u00xx` (lower-case hex),
/// everything else as it is.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let b = c as u32 as usize;
                out.push_str("\\u00");
                out.push(HEX[b >> 4] as char);
                out.push(HEX[b & 0xf] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A double as ECMAScript's `Number.prototype.toString` writes it (RFC 8785
/// §3.2.2.3): the shortest digits that read back as the same double, in
/// plain notation for decimal exponents from -6 to 20, else `d.ddde±n`.
pub fn write_number(out: &mut String, f: f64) -> Result<(), CoreError> {
    if !f.is_finite() {
        return Err(jcs_error("NaN or an infinity"));
    }
    if f == 0.0 {
        // Minus zero too.
        out.push('0');
        return Ok(());
    }
    if f < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` writes the shortest round-tripping digits: `d[.ddd]e±x`.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci
        .split_once('e')
        .ok_or_else(|| jcs_error("a number Rust did not write in exponent form"))?;
    let exp: i32 = exp
        .parse()
        .map_err(|_| jcs_error("a number with an unreadable exponent"))?;
    let digits = nearest_even(
        mantissa.chars().filter(|c| *c != '.').collect(),
        exp,
        f.abs(),
    );
    let k = digits.len() as i32;
    // The decimal point sits after `n` digits: value = 0.digits × 10^n.
    let n = exp + 1;
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        let (int, frac) = digits.split_at(n as usize);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        out.push('e');
        out.push(if n > 0 { '+' } else { '-' });
        out.push_str(&(n - 1).abs().to_string());
    }
    Ok(())
}

/// ECMAScript's tie rule: when the double lies exactly halfway between
/// two shortest candidates, the one with the even last digit (Rust rounds
/// the half up). Ties are rare and need the exact value, so it is written
/// out in full only when the other candidate also reads back as `f`.
fn nearest_even(digits: String, exp: i32, f: f64) -> String {
    let k = digits.len();
    let last = match digits.bytes().last() {
        Some(b) if k > 1 && (b - b'0') % 2 == 1 => b - b'0',
        _ => return digits,
    };
    let reads_back = |d: &str| {
        let (first, rest) = d.split_at(1);
        format!("{first}.{rest}e{exp}").parse::<f64>().ok() == Some(f)
    };
    // The even neighbours within the same number of digits (9 + 1 carries: not one).
    let neighbour = |digit: u8| {
        let mut d = digits.clone().into_bytes();
        d[k - 1] = b'0' + digit;
        String::from_utf8_lossy(&d).into_owned()
    };
    let mut neighbours = vec![neighbour(last - 1)];
    if last < 9 {
        neighbours.push(neighbour(last + 1));
    }
    neighbours.retain(|n| reads_back(n));
    if neighbours.is_empty() {
        return digits;
    }
    // A tie: the exact value is their midpoint, one digit longer, ending in 5.
    let exact = format!("{f:.800e}");
    let Some((m, e)) = exact.split_once('e') else {
        return digits;
    };
    if e.parse::<i32>().ok() != Some(exp) {
        return digits;
    }
    let exact_digits: String = m.chars().filter(|c| *c != '.').collect();
    let exact_digits = exact_digits.trim_end_matches('0');
    for n in neighbours {
        let lo = if n < digits { &n } else { &digits };
        if exact_digits == format!("{lo}5") {
            return n;
        }
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(bits: u64) -> String {
        let mut s = String::new();
        write_number(&mut s, f64::from_bits(bits)).unwrap();
        s
    }

    /// RFC 8785 Appendix B: IEEE 754 doubles (as bits) and their JSON.
    #[test]
    fn rfc8785_appendix_b_numbers() {
        for (bits, want) in [
            (0x0000000000000000u64, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ] {
            assert_eq!(num(bits), want, "{bits:#018x}");
        }
        let mut s = String::new();
        assert!(write_number(&mut s, f64::NAN).is_err());
        assert!(write_number(&mut s, f64::INFINITY).is_err());
    }

    /// Random doubles and exact ties (halfway between two shortest
    /// candidates: the even one), the expected text from Python's `repr`
    /// (David Gay's shortest digits, ties to even) rewritten in ECMAScript's
    /// notation. Not an independent vector for the notation, which the
    /// script wrote by the same rules; it checks the digits.
    #[test]
    fn digits_and_ties_agree_with_python() {
        for (bits, want) in [
            (0xc3187cb9dec16321, "-1723134297266376.2"),
            (0xc31d3325f1980c25, "-2054753096172297.2"),
            (0xc314896fc2cbbf4f, "-1445153159180243.8"),
            (0x431d5a54d5e2e92b, "2065523684194890.8"),
            (0x4305a37fe8dcedaa, "761343034236341.2"),
            (0x43012de9e1f705ae, "604444643221685.8"),
            (0xc3134a0a47c3bab1, "-1357358142910124.2"),
            (0xc2bf0dcb62d4d8d0, "-34144107287768.812"),
            (0xc3139f417eaecc05, "-1380782051144449.2"),
            (0xc2d85cecfea427b8, "-107149568675998.88"),
            (0x4312ed1fa74495f5, "1331817446712701.2"),
            (0xc2dfbebb40ab5d18, "-139616183299444.38"),
            (0xe81f9b0cbf4e7af6, "-3.604974044905782e+193"),
            (0xa8d4293433e798a0, "-5.23953414075117e-112"),
            (0x6eb58eea34854702, "1.9949430544100653e+225"),
            (0x8b4486c599cb381b, "-2.1872960784600417e-254"),
            (0x7a2d4f33c3b072e1, "3.325160904575236e+280"),
            (0xbaec80760aaf3a94, "-7.36754292310508e-25"),
            (0x3e113028f427d2bb, "1.0004805461717699e-9"),
            (0xbf6bbb58fc9c2429, "-0.0033852327368362367"),
            (0xc3e8d9dfd6bf76fe, "-14325667522277798000"),
            (0x3e5f8d205d415f26, "2.938441474894294e-8"),
            (0xbcad1974f7f003ee, "-2.0191793409341961e-16"),
        ] {
            assert_eq!(num(bits), want, "{bits:#018x}");
        }
    }

    /// RFC 8785 §3.2.2: the example of the whole serialization (numbers,
    /// string escapes, literals, member order).
    #[test]
    fn rfc8785_section_3_2_2_example() {
        let input = r#"{
            "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
            "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
            "literals": [null, true, false]
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        assert_eq!(
            canonicalize(&v).unwrap(),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    /// RFC 8785 §3.2.3: members sorted by UTF-16 code units, so the emoji
    /// (a surrogate pair, 0xD83D…) sorts before U+FB33 though its UTF-8
    /// bytes sort after.
    #[test]
    fn rfc8785_section_3_2_3_sorting() {
        let input = r#"{
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\ud83d\ude00": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        let c = canonicalize(&v).unwrap();
        let order: Vec<&str> = [
            "Carriage Return",
            "One",
            "Control",
            "Latin Small Letter O With Diaeresis",
            "Euro Sign",
            "Emoji: Grinning Face",
            "Hebrew Letter Dalet With Dagesh",
        ]
        .to_vec();
        let mut at = 0;
        for name in order {
            let i = c[at..]
                .find(name)
                .unwrap_or_else(|| panic!("{name} out of order in {c}"));
            at += i;
        }
        assert!(c.starts_with("{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":"));
    }

    #[test]
    fn nested_and_integers() {
        let v = json!({"b": [1, {"z": 2, "a": -3}], "a": {}, "c": [], "big": 9007199254740993u64});
        assert_eq!(
            canonicalize(&v).unwrap(),
            r#"{"a":{},"b":[1,{"a":-3,"z":2}],"big":9007199254740992,"c":[]}"#
        );
        assert_eq!(
            canonicalize(&json!("\u{7f}\u{1f}")).unwrap(),
            "\"\u{7f}\\u001f\""
        );
    }
}
