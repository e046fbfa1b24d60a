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

/// A TCP proxy in front of `target` that can black-hole the path: while
/// `cut` is set, every byte either way is dropped and the connections stay
/// open (no FIN, no RST), and so do the connections that were open during
/// the cut after it heals (as a TCP connection whose retransmissions back
/// off for minutes). Connections opened after healing work.
struct BlackHole {
    addr: String,
    cut: Arc<AtomicBool>,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start(target: String) -> BlackHole {
        let l = tokio::net::TcpListener::bind(any_port()).await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (cut2, accepted2) = (cut.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = l.accept().await else {
                    return;
                };
                accepted2.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                // Dead for good once it saw a cut.
                let dead = Arc::new(AtomicBool::new(cut2.load(Ordering::SeqCst)));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, cut2.clone(), dead.clone()));
                tokio::spawn(pump(sr, cw, cut2.clone(), dead));
            }
        });
        BlackHole {
            addr,
            cut,
            accepted,
            task,
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            dead.store(true, Ordering::SeqCst);
        }
        if dead.load(Ordering::SeqCst) {
            continue;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A black-holed path: requests time out; once it heals the next request
/// succeeds at once on a new connection, instead of waiting for TCP to give
/// up on the old one (which here never happens).
#[tokio::test]
async fn a_timed_out_silent_connection_is_redialed_when_the_path_heals() {
    let (_snet, _server, target) = server().await;
    let proxy = BlackHole::start(target).await;
    let client = Net::new(TokioTransport);
    let short = Duration::from_millis(200);
    let r = client.call(&proxy.addr, &renew(0, 1), T).await;
    assert!(matches!(r, Ok(Reply::LeaseRenew(Ok(_)))), "{r:?}");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);

    proxy.cut.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let r = client.call(&proxy.addr, &renew(0, 2), short).await;
        assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    }

    proxy.cut.store(false, Ordering::SeqCst);
    let r = client.call(&proxy.addr, &renew(0, 3), short).await;
    assert!(matches!(r, Ok(Reply::LeaseRenew(Ok(_)))), "{r:?}");
}

/// A request that times out while the same connection answers others (a
/// slow handler, not a dead path) leaves the connection in place.
#[tokio::test]
async fn a_slow_request_on_a_live_connection_keeps_it() {
    let (_snet, _server, target) = server().await;
    let proxy = BlackHole::start(target).await;
    let client = Net::new(TokioTransport);
    let r = client.call(&proxy.addr, &renew(0, 1), T).await;
    assert!(matches!(r, Ok(Reply::LeaseRenew(Ok(_)))), "{r:?}");
    // `Join` is never answered; renewals keep flowing meanwhile.
    let join = Request::Join {
        cluster_uid: "u".into(),
        cluster_name: "c".into(),
        node_id: 2,
    };
    let slow = {
        let (client, addr) = (client.clone(), proxy.addr.clone());
        tokio::spawn(async move { client.call(&addr, &join, Duration::from_millis(300)).await })
    };
    for k in 0..20 {
        let r = client.call(&proxy.addr, &renew(0, k), T).await;
        assert!(matches!(r, Ok(Reply::LeaseRenew(Ok(_)))), "{r:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = slow.await.unwrap();
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    let r = client.call(&proxy.addr, &renew(0, 99), T).await;
    assert!(matches!(r, Ok(Reply::LeaseRenew(Ok(_)))), "{r:?}");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1, "reconnected");
}

/// Member requests carry the sender's cluster uid and the member they are
/// meant for; a node in a cluster refuses them from another cluster, from
/// a node in none, or meant for another member, without handling them. The
/// handshake is answered whatever the sender.
#[tokio::test]
async fn member_requests_from_another_cluster_or_for_another_node_are_refused() {
    let (snet, _server, addr) = server().await;
    snet.set_identity("uid-a", 1);
    let vote = || Request::Vote(VoteRequest::new(openraft::Vote::new(9, 2), None));
    let handled =
        |r: &Result<Reply, NetError>| matches!(r, Ok(Reply::Refused(Refusal::NotInCluster)));

    let same = Net::new(TokioTransport);
    same.set_identity("uid-a", 2);
    // Reaches the handler (which refuses with NotInCluster).
    let r = same.call_to(&addr, Some(1), &vote(), T).await;
    assert!(handled(&r), "{r:?}");
    let r = same.call(&addr, &vote(), T).await;
    assert!(handled(&r), "{r:?}");
    let r = same.call_to(&addr, Some(1), &renew(0, 4), T).await;
    assert!(matches!(r, Ok(Reply::LeaseRenew(Ok(_)))), "{r:?}");

    let r = same.call_to(&addr, Some(3), &vote(), T).await;
    assert!(
        matches!(
            r,
            Ok(Reply::Refused(Refusal::WrongNode { ours: 1, meant: 3 }))
        ),
        "{r:?}"
    );

    let other = Net::new(TokioTransport);
    other.set_identity("uid-b", 2);
    let r = other.call_to(&addr, Some(1), &renew(0, 4), T).await;
    match &r {
        Ok(Reply::Refused(e @ Refusal::WrongCluster { ours, theirs })) => {
            assert_eq!((ours.as_str(), theirs.as_deref()), ("uid-a", Some("uid-b")));
            assert!(e.to_string().contains("another cluster"), "{e}");
        }
        other => panic!("{other:?}"),
    }

    let none = Net::new(TokioTransport);
    let r = none.call(&addr, &vote(), T).await;
    assert!(
        matches!(
            r,
            Ok(Reply::Refused(Refusal::WrongCluster { theirs: None, .. }))
        ),
        "{r:?}"
    );
    // The handshake is for nodes of no or another cluster.
    let r = other.call(&addr, &Request::Hello, T).await;
    assert!(handled(&r), "{r:?}");

    // openraft sees a refused member as unreachable, with the reason.
    let mut factory = RaftNet {
        net: other.clone(),
        id: 2,
    };
    let member = Member {
        name: "n1".into(),
        cluster_addr: addr.clone(),
        witness: false,
    };
    let mut peer = factory.new_client(1, &member).await;
    let vote = VoteRequest::new(openraft::Vote::new(9, 2), None);
    let e = peer
        .vote(vote, RPCOption::new(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(e, RPCError::Unreachable(_)), "{e:?}");
    assert!(e.to_string().contains("cluster uid-a"), "{e}");
}
