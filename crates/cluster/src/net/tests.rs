use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Answers lease renewals after `node` milliseconds (so replies overtake
/// each other), never answers `Join`, refuses the rest.
struct TestHandler;

impl Handler for TestHandler {
    async fn handle(&self, req: Request) -> Reply {
        match req {
            Request::LeaseRenew { node, term } => {
                tokio::time::sleep(Duration::from_millis(node)).await;
                Reply::LeaseRenew(Ok(LeaseGrant { term }))
            }
            Request::Join { .. } => std::future::pending().await,
            _ => Reply::Refused(Refusal::NotInCluster),
        }
    }
}

const T: Duration = Duration::from_secs(5);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn server() -> (Net<TokioTransport>, Server, String) {
    let net = Net::new(TokioTransport);
    let server = net.serve(any_port(), Arc::new(TestHandler)).await.unwrap();
    let addr = server.local_addr().to_string();
    (net, server, addr)
}

fn renew(node: NodeId, term: u64) -> Request {
    Request::LeaseRenew { node, term }
}

#[tokio::test]
async fn replies_out_of_order_on_one_connection() {
    let (_snet, _server, addr) = server().await;
    let client = Net::new(TokioTransport);
    // Slow first: the fast ones overtake it on the same connection.
    let calls = (0..20u64).map(|i| {
        let (client, addr) = (client.clone(), addr.clone());
        async move {
            let delay = if i == 0 { 300 } else { i };
            (i, client.call(&addr, &renew(delay, i), T).await)
        }
    });
    let results = futures_join_all(calls).await;
    for (i, r) in results {
        match r {
            Ok(Reply::LeaseRenew(Ok(g))) => assert_eq!(g.term, i),
            other => panic!("request {i}: {other:?}"),
        }
    }
    assert_eq!(lock(&client.inner.peers).len(), 1);
}

/// Joins futures without another dependency: spawn them all, await in order.
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn timeout_frees_the_slot_and_reconnects_after_restart() {
    let (snet, server, addr) = server().await;
    let client = Net::new(TokioTransport);
    let join = Request::Join {
        cluster_uid: "u".into(),
        cluster_name: "c".into(),
        node_id: 2,
    };
    let r = client.call(&addr, &join, Duration::from_millis(100)).await;
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    {
        let peers = lock(&client.inner.peers);
        let peer = peers.get(&addr).unwrap();
        let conn = peer.conn.try_lock().unwrap();
        assert!(lock(&conn.as_ref().unwrap().shared.pending).is_empty());
    }

    // The server goes away: requests fail, nothing hangs.
    let sock = server.local_addr();
    drop(server);
    drop(snet);
    let r = client
        .call(&addr, &renew(0, 1), Duration::from_secs(1))
        .await;
    assert!(r.is_err(), "{r:?}");

    // Back on the same port: the next request reconnects.
    let snet = Net::new(TokioTransport);
    let _server = snet.serve(sock, Arc::new(TestHandler)).await.unwrap();
    let mut ok = false;
    for _ in 0..20 {
        if let Ok(Reply::LeaseRenew(Ok(_))) = client.call(&addr, &renew(0, 1), T).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "did not reconnect");
}

#[tokio::test]
async fn connect_failure_is_not_sent() {
    // A port nobody listens on: bind one, then close it.
    let l = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let client = Net::new(TokioTransport);
    let e = client.call(&addr, &renew(0, 1), T).await.unwrap_err();
    assert!(e.not_sent(), "{e:?}");
}

/// Reads until the server closes the connection; fails if it answers.
async fn expect_closed(s: &mut tokio::net::TcpStream) {
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "server answered a malformed frame");
}

#[tokio::test]
async fn malformed_frames_close_the_connection_only() {
    let (_snet, _server, addr) = server().await;

    // Not JSON.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0, 0, 0, 3, b'x', b'y', b'z']).await.unwrap();
    expect_closed(&mut s).await;

    // JSON, but not a request.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&frame::encode(&vec![1, 2, 3]).unwrap())
        .await
        .unwrap();
    expect_closed(&mut s).await;

    // A length over the limit: refused from the header alone.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    expect_closed(&mut s).await;

    // An empty frame.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0, 0, 0, 0]).await.unwrap();
    expect_closed(&mut s).await;

    // The server still serves well-formed clients.
    let client = Net::new(TokioTransport);
    let r = client.call(&addr, &renew(0, 7), T).await;
    assert!(
        matches!(r, Ok(Reply::LeaseRenew(Ok(LeaseGrant { term: 7 })))),
        "{r:?}"
    );
}

#[tokio::test]
async fn malformed_reply_fails_the_caller() {
    // A "server" that answers every request with garbage.
    let l = tokio::net::TcpListener::bind(any_port()).await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let bad = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(&[0, 0, 0, 2, b'{', b'}']).await;
        let _ = s.read(&mut buf).await;
    });
    let client = Net::new(TokioTransport);
    let r = client.call(&addr, &renew(0, 1), T).await;
    assert!(matches!(r, Err(NetError::Closed { .. })), "{r:?}");
    bad.abort();
}

#[tokio::test]
async fn isolation_cuts_both_ways() {
    let (snet, _server, addr) = server().await;
    let client = Net::new(TokioTransport);
    assert!(client.call(&addr, &renew(0, 1), T).await.is_ok());

    client.set_isolated(true);
    assert_eq!(
        client.call(&addr, &renew(0, 1), T).await.unwrap_err(),
        NetError::Isolated
    );
    client.set_isolated(false);

    snet.set_isolated(true);
    let r = client
        .call(&addr, &renew(0, 1), Duration::from_millis(500))
        .await;
    assert!(r.is_err(), "{r:?}");
    snet.set_isolated(false);
    let mut ok = false;
    for _ in 0..20 {
        if client.call(&addr, &renew(0, 1), T).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn wrong_reply_kind_is_a_network_error_for_raft() {
    let (_snet, _server, addr) = server().await;
    let mut factory = RaftNet {
        net: Net::new(TokioTransport),
        id: 1,
    };
    let member = Member {
        name: "n2".into(),
        cluster_addr: addr,
        witness: false,
    };
    let mut peer = factory.new_client(2, &member).await;
    let vote = VoteRequest::new(openraft::Vote::new(1, 1), None);
    let e = peer
        .vote(vote, RPCOption::new(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(e, RPCError::Network(_)), "{e:?}");
}
