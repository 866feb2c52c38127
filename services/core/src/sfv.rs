//! The part of Structured Field Values (RFC 8941) that HTTP Message
//! Signatures (RFC 9421) and `Content-Digest` (RFC 9530) need: dictionaries
//! whose members are items or inner lists, with parameters.
use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::CoreError;

/// A bare item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bare {
    /// `"…"`
    String(String),
    /// A token.
    Token(String),
    /// An integer.
    Integer(i64),
    /// `:…:` base64.
    Bytes(Vec<u8>),
    /// `?1` / `?0`.
    Bool(bool),
}

/// Parameters in order.
pub type Params = Vec<(String, Bare)>;

/// An item with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The value.
    pub bare: Bare,
    /// Its parameters.
    pub params: Params,
}

/// A dictionary member value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// A single item.
    Item(Item),
    /// An inner list with the list's parameters.
    List(Vec<Item>, Params),
}

fn err(m: &str) -> CoreError {
    CoreError::MalformedSignature(format!("structured field: {m}"))
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
}

impl P<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }
    fn key(&mut self) -> Result<String, CoreError> {
        let start = self.i;
        match self.peek() {
            Some(c) if c.is_ascii_lowercase() || c == b'*' => {}
            _ => return Err(err("bad key")),
        }
        while let Some(c) = self.peek() {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.*".contains(&c) {
                self.i += 1;
            } else {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn bare(&mut self) -> Result<Bare, CoreError> {
        match self.peek() {
            Some(b'"') => {
                self.i += 1;
                let mut out = String::new();
                loop {
                    match self.peek() {
                        None => return Err(err("unterminated string")),
                        Some(b'\\') => {
                            self.i += 1;
                            match self.peek() {
                                Some(c @ (b'"' | b'\\')) => {
                                    out.push(c as char);
                                    self.i += 1;
                                }
                                _ => return Err(err("bad escape")),
                            }
                        }
                        Some(b'"') => {
                            self.i += 1;
                            return Ok(Bare::String(out));
                        }
                        Some(c) if (0x20..0x7f).contains(&c) => {
                            out.push(c as char);
                            self.i += 1;
                        }
                        Some(_) => return Err(err("bad string character")),
                    }
                }
            }
            Some(b':') => {
                self.i += 1;
                let start = self.i;
                while let Some(c) = self.peek() {
                    if c == b':' {
                        break;
                    }
                    self.i += 1;
                }
                if self.peek() != Some(b':') {
                    return Err(err("unterminated byte sequence"));
                }
                let b = STANDARD
                    .decode(&self.s[start..self.i])
                    .map_err(|_| err("bad base64"))?;
                self.i += 1;
                Ok(Bare::Bytes(b))
            }
            Some(b'?') => {
                self.i += 1;
                let v = match self.peek() {
                    Some(b'1') => true,
                    Some(b'0') => false,
                    _ => return Err(err("bad boolean")),
                };
                self.i += 1;
                Ok(Bare::Bool(v))
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
                    self.i += 1;
                }
                let text =
                    std::str::from_utf8(&self.s[start..self.i]).map_err(|_| err("bad integer"))?;
                if self.i - start > 16 {
                    return Err(err("integer too long"));
                }
                text.parse()
                    .map(Bare::Integer)
                    .map_err(|_| err("bad integer"))
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'*' => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&c) {
                        self.i += 1;
                    } else {
                        break;
                    }
                }
                Ok(Bare::Token(
                    String::from_utf8_lossy(&self.s[start..self.i]).into_owned(),
                ))
            }
            _ => Err(err("bad item")),
        }
    }
    fn params(&mut self) -> Result<Params, CoreError> {
        let mut out = Vec::new();
        while self.peek() == Some(b';') {
            self.i += 1;
            self.sp();
            let k = self.key()?;
            let v = if self.peek() == Some(b'=') {
                self.i += 1;
                self.bare()?
            } else {
                Bare::Bool(true)
            };
            out.retain(|(ok, _)| *ok != k);
            out.push((k, v));
        }
        Ok(out)
    }
    fn item(&mut self) -> Result<Item, CoreError> {
        let bare = self.bare()?;
        let params = self.params()?;
        Ok(Item { bare, params })
    }
    fn member(&mut self) -> Result<Member, CoreError> {
        if self.peek() == Some(b'(') {
            self.i += 1;
            let mut items = Vec::new();
            loop {
                self.sp();
                if self.peek() == Some(b')') {
                    self.i += 1;
                    break;
                }
                items.push(self.item()?);
                match self.peek() {
                    Some(b' ') | Some(b')') => {}
                    _ => return Err(err("bad inner list")),
                }
            }
            let params = self.params()?;
            Ok(Member::List(items, params))
        } else {
            Ok(Member::Item(self.item()?))
        }
    }
}

/// Parses a dictionary; later duplicates of a key replace earlier ones.
pub fn parse_dictionary(input: &str) -> Result<Vec<(String, Member)>, CoreError> {
    let mut p = P {
        s: input.as_bytes(),
        i: 0,
    };
    let mut out: Vec<(String, Member)> = Vec::new();
    p.sp();
    if p.peek().is_none() {
        return Ok(out);
    }
    loop {
        let k = p.key()?;
        let m = if p.peek() == Some(b'=') {
            p.i += 1;
            p.member()?
        } else {
            Member::Item(Item {
                bare: Bare::Bool(true),
                params: p.params()?,
            })
        };
        out.retain(|(ok, _)| *ok != k);
        out.push((k, m));
        p.ows();
        match p.peek() {
            None => return Ok(out),
            Some(b',') => {
                p.i += 1;
                p.ows();
                if p.peek().is_none() {
                    return Err(err("trailing comma"));
                }
            }
            Some(_) => return Err(err("expected comma")),
        }
    }
}

/// Serializes a bare item canonically.
pub fn serialize_bare(b: &Bare, out: &mut String) {
    match b {
        Bare::String(s) => {
            out.push('"');
            for c in s.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        Bare::Token(t) => out.push_str(t),
        Bare::Integer(n) => out.push_str(&n.to_string()),
        Bare::Bytes(b) => {
            out.push(':');
            STANDARD.encode_string(b, out);
            out.push(':');
        }
        Bare::Bool(v) => out.push_str(if *v { "?1" } else { "?0" }),
    }
}

/// Serializes parameters canonically (`;key` for true).
pub fn serialize_params(ps: &Params, out: &mut String) {
    for (k, v) in ps {
        out.push(';');
        out.push_str(k);
        if *v != Bare::Bool(true) {
            out.push('=');
            serialize_bare(v, out);
        }
    }
}

/// Serializes an item canonically.
pub fn serialize_item(i: &Item, out: &mut String) {
    serialize_bare(&i.bare, out);
    serialize_params(&i.params, out);
}

/// Serializes an inner list canonically.
pub fn serialize_list(items: &[Item], params: &Params, out: &mut String) {
    out.push('(');
    for (n, i) in items.iter().enumerate() {
        if n > 0 {
            out.push(' ');
        }
        serialize_item(i, out);
    }
    out.push(')');
    serialize_params(params, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signature_input_and_round_trips() {
        let d = parse_dictionary(
            r#"sig1=("@method" "@authority" "content-digest");created=1618884473;keyid="test-key-rsa", proxy=:AAEC:"#,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        let Member::List(items, params) = &d[0].1 else {
            panic!()
        };
        let mut s = String::new();
        serialize_list(items, params, &mut s);
        assert_eq!(
            s,
            r#"("@method" "@authority" "content-digest");created=1618884473;keyid="test-key-rsa""#
        );
        assert_eq!(
            d[1].1,
            Member::Item(Item {
                bare: Bare::Bytes(vec![0, 1, 2]),
                params: vec![]
            })
        );
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["sig1=(", "sig1=\"x", "Sig=1", "a=1,", "a=:!!:"] {
            assert!(parse_dictionary(bad).is_err(), "{bad}");
        }
    }
}
