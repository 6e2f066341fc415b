//! The ceiling: a plain tokio TCP echo that writes back every byte it reads, no WebSocket at
//! all. `tether bench echo --raw` sends it the frames a WebSocket client would and expects
//! them back unchanged; `tether bench idle --raw` holds plain TCP connections to it.
//!
//! A connection's 64 KiB buffer is allocated when its first byte arrives, so an idle
//! connection costs only its task and socket.
//!
//! `tcp-echo --port 0` prints `listening on ws://ADDR/`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    tether_bench_peers::run(|listener| async move {
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(echo(stream));
        }
    });
}

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Allocate once the first byte is there (a fresh socket's first readiness is spurious).
    if stream.peek(&mut [0u8; 1]).await? == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
