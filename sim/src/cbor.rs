//! Minimal CBOR (RFC 8949) for the DDI API's `application/cbor` bodies: hawkBit re-encodes the
//! JSON structure 1:1, so this maps `serde_json::Value` to CBOR and back (definite and
//! indefinite lengths on input; shortest definite forms on output). No tags, no byte strings.

use serde_json::{Map, Number, Value};

/// A CBOR input that cannot be read as a JSON value.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CBOR at byte {offset}: {reason}")]
pub struct CborError {
    pub offset: usize,
    pub reason: String,
}

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// Encodes a JSON value as CBOR.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(v, &mut out);
    out
}

fn encode_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(0xf6),
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                head(out, 0, u);
            } else if let Some(i) = n.as_i64() {
                head(out, 1, (-1 - i) as u64);
            } else {
                out.push(0xfb);
                out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_be_bytes());
            }
        }
        Value::String(s) => {
            head(out, 3, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(a) => {
            head(out, 4, a.len() as u64);
            for x in a {
                encode_into(x, out);
            }
        }
        Value::Object(m) => {
            head(out, 5, m.len() as u64);
            for (k, x) in m {
                head(out, 3, k.len() as u64);
                out.extend_from_slice(k.as_bytes());
                encode_into(x, out);
            }
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    depth: usize,
}

const MAX_DEPTH: usize = 64;

impl Reader<'_> {
    fn err(&self, reason: impl Into<String>) -> CborError {
        CborError {
            offset: self.pos,
            reason: reason.into(),
        }
    }
    fn byte(&mut self) -> Result<u8, CborError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or_else(|| self.err("unexpected end"))?;
        self.pos += 1;
        Ok(b)
    }
    fn take(&mut self, n: usize) -> Result<&[u8], CborError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len());
        let end = end.ok_or_else(|| self.err("unexpected end"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// The argument of a head; None = indefinite length.
    fn arg(&mut self, info: u8) -> Result<Option<u64>, CborError> {
        Ok(Some(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.byte()?),
            25 => u64::from(u16::from_be_bytes(
                self.take(2)?.try_into().expect("2 bytes"),
            )),
            26 => u64::from(u32::from_be_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            27 => u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")),
            31 => return Ok(None),
            _ => return Err(self.err("reserved additional information")),
        }))
    }
    fn at_break(&mut self) -> bool {
        if self.data.get(self.pos) == Some(&0xff) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn text(&mut self, info: u8) -> Result<String, CborError> {
        match self.arg(info)? {
            Some(n) => {
                let n = usize::try_from(n).map_err(|_| self.err("string too long"))?;
                let bytes = self.take(n)?.to_vec();
                String::from_utf8(bytes).map_err(|_| self.err("text is not UTF-8"))
            }
            None => {
                let mut s = String::new();
                while !self.at_break() {
                    let b = self.byte()?;
                    if b >> 5 != 3 || b & 0x1f == 31 {
                        return Err(self.err("bad chunk in indefinite text"));
                    }
                    s.push_str(&self.text(b & 0x1f)?);
                }
                Ok(s)
            }
        }
    }
    fn value(&mut self) -> Result<Value, CborError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        let b = self.byte()?;
        let (major, info) = (b >> 5, b & 0x1f);
        let v = match major {
            0 => Value::from(
                self.arg(info)?
                    .ok_or_else(|| self.err("indefinite integer"))?,
            ),
            1 => {
                let n = self
                    .arg(info)?
                    .ok_or_else(|| self.err("indefinite integer"))?;
                let i = i64::try_from(n).map_err(|_| self.err("negative integer out of range"))?;
                Value::from(-1 - i)
            }
            3 => Value::String(self.text(info)?),
            4 => {
                let mut a = Vec::new();
                match self.arg(info)? {
                    Some(n) => {
                        for _ in 0..n {
                            a.push(self.value()?);
                        }
                    }
                    None => {
                        while !self.at_break() {
                            a.push(self.value()?);
                        }
                    }
                }
                Value::Array(a)
            }
            5 => {
                let mut m = Map::new();
                let len = self.arg(info)?;
                let mut i = 0u64;
                loop {
                    match len {
                        Some(n) if i >= n => break,
                        None if self.at_break() => break,
                        _ => {}
                    }
                    let kb = self.byte()?;
                    if kb >> 5 != 3 {
                        return Err(self.err("map keys must be text"));
                    }
                    let k = self.text(kb & 0x1f)?;
                    let v = self.value()?;
                    m.insert(k, v);
                    i += 1;
                }
                Value::Object(m)
            }
            7 => match info {
                20 => Value::Bool(false),
                21 => Value::Bool(true),
                22 | 23 => Value::Null,
                25 => {
                    let h = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes"));
                    float(half_to_f64(h))
                }
                26 => float(f64::from(f32::from_be_bytes(
                    self.take(4)?.try_into().expect("4 bytes"),
                ))),
                27 => float(f64::from_be_bytes(
                    self.take(8)?.try_into().expect("8 bytes"),
                )),
                _ => return Err(self.err("unsupported simple value")),
            },
            _ => return Err(self.err("byte strings and tags are not used by DDI")),
        };
        self.depth -= 1;
        Ok(v)
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn half_to_f64(h: u16) -> f64 {
    let exp = (h >> 10) & 0x1f;
    let mant = f64::from(h & 0x3ff);
    let v = match exp {
        0 => mant * 2f64.powi(-24),
        31 => {
            if mant == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        e => (mant + 1024.0) * 2f64.powi(i32::from(e) - 25),
    };
    if h & 0x8000 != 0 {
        -v
    } else {
        v
    }
}

/// Decodes one CBOR data item (the whole input) as a JSON value.
pub fn decode(data: &[u8]) -> Result<Value, CborError> {
    let mut r = Reader {
        data,
        pos: 0,
        depth: 0,
    };
    let v = r.value()?;
    if r.pos != data.len() {
        return Err(r.err("trailing bytes"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_ddi_bodies() {
        let v = json!({"status": {"execution": "closed", "result": {"finished": "success", "progress": {"cnt": 2, "of": 300}}, "code": -4711, "details": ["a", ""]}, "timestamp": 1733218554123u64, "x": 1.5, "n": null, "b": true});
        assert_eq!(decode(&encode(&v)).unwrap(), v);
    }

    #[test]
    fn reads_rfc_8949_examples() {
        assert_eq!(decode(&[0x19, 0x03, 0xe8]).unwrap(), json!(1000));
        assert_eq!(decode(&[0x38, 0x63]).unwrap(), json!(-100));
        assert_eq!(decode(&[0xf9, 0x3c, 0x00]).unwrap(), json!(1.0));
        assert_eq!(
            decode(&[0x7f, 0x62, b'a', b'b', 0x61, b'c', 0xff]).unwrap(),
            json!("abc")
        );
        assert_eq!(
            decode(&[0xbf, 0x61, b'a', 0x01, 0xff]).unwrap(),
            json!({"a": 1})
        );
        assert_eq!(decode(&[0x9f, 0x01, 0x02, 0xff]).unwrap(), json!([1, 2]));
        assert_eq!(encode(&json!(1000)), vec![0x19, 0x03, 0xe8]);
        assert!(decode(&[0x01, 0x02]).is_err());
        assert!(decode(&[0x62, b'a']).is_err());
        assert!(decode(&[0x41, 0x00]).is_err());
    }
}
