//! A test binary of its own (its own process): it lowers the open-file limit.
use stampede_runtime::http_client::OutboundClient;
use stampede_runtime::{Config, Error};
use url::Url;

/// A connection that cannot get a file descriptor fails as `Exhausted`, not
/// as a connection failure the remote host would be blamed for.
#[tokio::test(flavor = "current_thread")]
async fn a_connect_without_a_free_descriptor_is_local_exhaustion() {
    let cfg = Config::from_lookup(|k| {
        (k == "STAMPEDE_ALLOW_PRIVATE_NETWORKS").then(|| "true".to_string())
    })
    .unwrap();
    let client = OutboundClient::new(&cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = Url::parse(&format!("http://{}/inbox", listener.local_addr().unwrap())).unwrap();

    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    rlimit::Resource::NOFILE.set(open + 8, hard).unwrap();
    // Take every descriptor left under the limit, holes included.
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
    }
    let req = client.client().post(url.clone()).body("{}");
    let r = client.send(req, &url, 1024).await;
    drop(held);
    rlimit::Resource::NOFILE.set(soft, hard).unwrap();
    assert!(matches!(r, Err(Error::Exhausted(_))), "{r:?}");

    // With descriptors back, the same request reaches the listener.
    let accept = tokio::spawn(async move { listener.accept().await.is_ok() });
    let req = client.client().post(url.clone()).body("{}");
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        client.send(req, &url, 1024),
    )
    .await;
    assert!(accept.await.unwrap());
}
