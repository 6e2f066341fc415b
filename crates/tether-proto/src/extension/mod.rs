//! `Sec-WebSocket-Extensions` (RFC 6455 §9.1) and the one extension tether speaks,
//! permessage-deflate (RFC 7692, [`deflate`]).
//!
//! ```text
//! extension-list = 1#extension
//! extension      = extension-token *( ";" extension-param )
//! extension-param = token [ "=" (token | quoted-string) ]
//! ```

pub mod deflate;

/// One extension of a `Sec-WebSocket-Extensions` list: its name and parameters, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// The extension token, e.g. `permessage-deflate`.
    pub name: String,
    /// Parameters as (name, value); a quoted value is unquoted.
    pub params: Vec<(String, Option<String>)>,
}

/// A `Sec-WebSocket-Extensions` value that does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Sec-WebSocket-Extensions: {0}")]
pub struct MalformedExtensions(pub String);

/// Parses every `Sec-WebSocket-Extensions` value (several headers are one list).
///
/// # Errors
/// [`MalformedExtensions`] when an element breaks the grammar (empty names, bad tokens,
/// unterminated quotes).
pub fn parse<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Extension>, MalformedExtensions> {
    let mut out = Vec::new();
    for value in values {
        for element in split_outside_quotes(value, ',')? {
            let element = element.trim();
            if element.is_empty() {
                continue;
            }
            let mut parts = split_outside_quotes(element, ';')?.into_iter();
            let name = parts.next().unwrap_or_default().trim();
            if !is_token(name) {
                return Err(MalformedExtensions(format!("bad extension name {name:?}")));
            }
            let mut params = Vec::new();
            for param in parts {
                let param = param.trim();
                let (key, value) = match param.split_once('=') {
                    Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
                    None => (param, None),
                };
                if !is_token(key) {
                    return Err(MalformedExtensions(format!("bad parameter name {key:?}")));
                }
                params.push((key.to_ascii_lowercase(), value));
            }
            out.push(Extension {
                name: name.to_ascii_lowercase(),
                params,
            });
        }
    }
    Ok(out)
}

/// Splits on `sep` where it is not inside a quoted string.
fn split_outside_quotes(s: &str, sep: char) -> Result<Vec<&str>, MalformedExtensions> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err(MalformedExtensions(format!("unterminated quote in {s:?}")));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// A parameter value: a token, or a quoted string whose content must itself be a token
/// (RFC 6455 §9.1).
fn unquote(v: &str) -> Result<String, MalformedExtensions> {
    let inner = match v.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .ok_or_else(|| MalformedExtensions(format!("bad quoted value {v:?}")))?
            .replace('\\', ""),
        None => v.to_owned(),
    };
    if is_token(&inner) {
        Ok(inner)
    } else {
        Err(MalformedExtensions(format!("bad parameter value {v:?}")))
    }
}

fn is_token(s: &str) -> bool {
    crate::handshake::is_token(s)
}

impl std::fmt::Display for Extension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        for (key, value) in &self.params {
            match value {
                Some(v) => write!(f, "; {key}={v}")?,
                None => write!(f, "; {key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_several_offers_with_and_without_values() {
        let list = parse([
            "permessage-deflate; client_max_window_bits; server_max_window_bits=\"10\", permessage-deflate",
            "x-custom",
        ])
        .unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].name, "permessage-deflate");
        assert_eq!(
            list[0].params,
            vec![
                ("client_max_window_bits".into(), None),
                ("server_max_window_bits".into(), Some("10".into()))
            ]
        );
        assert!(list[1].params.is_empty());
        assert_eq!(list[2].name, "x-custom");
        assert_eq!(
            list[0].to_string(),
            "permessage-deflate; client_max_window_bits; server_max_window_bits=10"
        );
    }

    #[test]
    fn rejects_broken_grammar() {
        for bad in [
            "permessage-deflate; =1",
            "per message",
            "a; b=\"unterminated",
            "a; b=\"x y\"",
            "; x",
        ] {
            assert!(parse([bad]).is_err(), "{bad}");
        }
    }
}
