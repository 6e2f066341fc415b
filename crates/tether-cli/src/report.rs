//! Errors as one line for a person: every cause once, and a hint where the cause has a known
//! remedy.

use std::error::Error;

use tether_server::store::StoreError;

/// `e` and its causes on one line. A cause whose text the line already holds is skipped
/// (many errors print their cause and also return it as `source()`), and a hint for the
/// first cause that has one is added in parentheses.
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut hint = None;
    let mut cause = Some(e);
    while let Some(err) = cause {
        if !std::ptr::addr_eq(err, e) {
            let text = err.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
        }
        hint = hint.or_else(|| hint_for(err));
        cause = err.source();
    }
    match hint {
        Some(hint) => format!("{line} ({hint})"),
        None => line,
    }
}

/// What to do about one cause, if the CLI knows.
fn hint_for(err: &(dyn Error + 'static)) -> Option<String> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return tls_hint(tls).map(str::to_owned);
    }
    if let Some(tether_server::serve::ServerError::Bind { addr, source }) =
        err.downcast_ref::<tether_server::serve::ServerError>()
    {
        return match source.kind() {
            std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => Some(
                "ports below 1024 need privileges: use a port from 1024 up, or give the \
                 binary CAP_NET_BIND_SERVICE"
                    .into(),
            ),
            std::io::ErrorKind::AddrInUse => {
                Some(format!("another process is listening on {addr}"))
            }
            _ => None,
        };
    }
    // `ServerError::Store` is transparent: its source is the store error's source.
    if let Some(tether_server::serve::ServerError::Store(store)) =
        err.downcast_ref::<tether_server::serve::ServerError>()
    {
        return store_hint(store);
    }
    err.downcast_ref::<StoreError>().and_then(store_hint)
}

fn store_hint(e: &StoreError) -> Option<String> {
    let StoreError::Dir { path, source } = e else {
        return None;
    };
    match source.kind() {
        std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory => Some(format!(
            "--data names a directory to keep the data in, and {path} is a file"
        )),
        std::io::ErrorKind::PermissionDenied => {
            Some(format!("this user may not create or write {path}"))
        }
        _ => None,
    }
}

fn tls_hint(e: &rustls::Error) -> Option<&'static str> {
    use rustls::{CertificateError, InvalidMessage};
    match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => Some(
                "the server's certificate is signed by a CA this client does not trust: pass \
                 that CA's certificate with --ca FILE (PEM), or use --insecure for a test server",
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Some("the server's certificate is for another host name")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                Some("the server's certificate has expired")
            }
            // webpki's reason travels as text inside `Other`.
            CertificateError::Other(other)
                if format!("{other:?}").contains("CaUsedAsEndEntity") =>
            {
                Some(
                    "the server presents a CA certificate as its own (a self-signed certificate \
                     made with CA:TRUE): sign a separate server certificate with that CA and pass \
                     the CA with --ca, or use --insecure for a test server",
                )
            }
            _ => None,
        },
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType) => {
            Some("the server did not answer in TLS: is it a plain ws:// server?")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("binding 127.0.0.1:80: {source}")]
    struct Wrapped {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_line_is_not_repeated() {
        let e = Wrapped {
            source: std::io::Error::other("Address already in use (os error 98)"),
        };
        assert_eq!(
            one_line(&e),
            "binding 127.0.0.1:80: Address already in use (os error 98)"
        );
    }

    #[test]
    fn a_cause_not_in_the_line_is_added_once() {
        let e = anyhow::Error::new(std::io::Error::other("disk full")).context("writing the file");
        assert_eq!(one_line(&*e), "writing the file: disk full");
    }
}
