//! The admin API over the in-memory fake service, for trying the CLI or an
//! API client without a node: `cargo run -p sanvirt-admin --features fake
//! --example fake_sanvirtd -- 127.0.0.1:7480 TOKEN`. Mdisk paths are real
//! files (created with `create_size_bytes`); nothing else touches the disk.

use std::sync::Arc;

use sanvirt_admin::fake::FakeService;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7480".into());
    let token = args.next().unwrap_or_else(|| "fake-token".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "fake sanvirtd admin API on http://{}",
        listener.local_addr()?
    );
    let app = sanvirt_admin::router(Arc::new(FakeService::new()), token);
    sanvirt_admin::serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
