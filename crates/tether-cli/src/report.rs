//! Errors as one line for a person: every cause once, and a hint where the cause has a known
//! remedy.

use std::error::Error;

use tether_server::engine::store::StoreError;

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
        // A TLS failure's text is rustls's debug form: said in words instead.
        if let Some((words, tls_hint)) = err.downcast_ref::<rustls::Error>().and_then(tls_words) {
            line = line.replace(&err.to_string(), words);
            hint = hint.or_else(|| Some(tls_hint.to_owned()));
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
    if let Some(tether_server::endpoints::serve::ServerError::Bind { addr, source }) =
        err.downcast_ref::<tether_server::endpoints::serve::ServerError>()
    {
        return match source.kind() {
            std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => Some(
                "ports below 1024 need privileges: use a port from 1024 up, or give the \
                 binary CAP_NET_BIND_SERVICE"
                    .into(),
            ),
            std::io::ErrorKind::AddrInUse => Some(format!(
                "another process is listening on {addr}: pick another port with --port"
            )),
            _ => None,
        };
    }
    // `tether echo` binds its address itself.
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        if io.kind() == std::io::ErrorKind::AddrInUse {
            return Some(
                "another process is listening there: pick another port with --port".into(),
            );
        }
    }
    if let Some(tether::Error::Connect { source, .. }) = err.downcast_ref::<tether::Error>() {
        if source.kind() == std::io::ErrorKind::ConnectionRefused {
            return Some("nothing listens there: is the server running, on this port?".into());
        }
    }
    // `ServerError::Store` is transparent: its source is the store error's source.
    if let Some(tether_server::endpoints::serve::ServerError::Store(store)) =
        err.downcast_ref::<tether_server::endpoints::serve::ServerError>()
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

/// A TLS failure in words, with rustls's name for it, and what to do.
fn tls_words(e: &rustls::Error) -> Option<(&'static str, &'static str)> {
    use rustls::{CertificateError, InvalidMessage};
    match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => Some((
                "the server's certificate is signed by a CA this client does not trust \
                 (UnknownIssuer)",
                "pass that CA's certificate with --ca FILE (PEM), or use --insecure for a test \
                 server",
            )),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Some((
                    "the server's certificate is for another host name (NotValidForName)",
                    "connect with a name the certificate holds",
                ))
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Some((
                "the server's certificate has expired (Expired)",
                "the server needs a new certificate; --insecure skips the check for a test \
                 server",
            )),
            // webpki's reason travels inside `Other`, as an error value of its own type.
            CertificateError::Other(other)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                Some((
                    "the server presents a CA certificate (CA:TRUE) as its own, which TLS \
                     refuses (CaUsedAsEndEntity)",
                    "sign a separate server certificate with that CA and pass the CA with --ca, \
                     or use --insecure for a test server",
                ))
            }
            _ => None,
        },
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType) => Some((
            "the server did not answer in TLS",
            "is it a plain ws:// server?",
        )),
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
