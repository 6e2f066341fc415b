//! A `wss://` echo server over tokio-rustls: TLS is accepted first, then the WebSocket
//! handshake runs over the TLS stream (any `AsyncRead + AsyncWrite` works as a transport).
//!
//! Run: `cargo run -p tether --example tls_server -- 127.0.0.1:9443 cert.pem key.pem`. Without
//! files it makes a CA and a certificate for `localhost`, and writes the CA to `tls-ca.pem`:
//! `tether connect wss://localhost:9443/ --ca tls-ca.pem`.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The certificate chain and key from PEM files, or made on the spot for `localhost`.
fn identity(
    files: Option<(String, String)>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BoxError> {
    if let Some((cert, key)) = files {
        let chain = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
        return Ok((chain, PrivateKeyDer::from_pem_file(&key)?));
    }
    // A CA, and a server certificate it signs (a self-signed certificate made as a CA is
    // refused by TLS clients as a server's own).
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".into()])?.signed_by(&key, &ca, &ca_key)?;
    std::fs::write("tls-ca.pem", ca.pem())?;
    println!("wrote tls-ca.pem: connect with --ca tls-ca.pem");
    Ok((
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    ))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9443".into());
    let files = args.next().zip(args.next());
    let (chain, key) = identity(files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on wss://{}/", listener.local_addr()?);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // Each step has its own failure: a client that is not TLS, then one that is not
            // WebSocket.
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => return eprintln!("{peer}: TLS: {e}"),
            };
            let mut ws = match tether::accept(tls).await {
                Ok(ws) => ws,
                Err(e) => return eprintln!("{peer}: {e}"),
            };
            while let Some(Ok(message)) = ws.recv().await {
                if message.is_data() && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
    }
}
