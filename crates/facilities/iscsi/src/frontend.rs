//! The iSCSI front-end facility: the IOClient at the left end of the stack,
//! serving the SCSI target over RFC 7143.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use sanvirt_facility::{BufferPool, DiskPathEvent, FrontEndDiskEvent, IoClient, IoServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::{ConfigError, IscsiConfig};
use crate::connection::{exec, ConnContext, Connection};
use crate::limits::*;
use crate::login::{LoginContext, LoginDone, LoginMachine, SessionType, Step};
use crate::pdu::{self, login_status, op, Bhs, Request, Seq};
use crate::scsi::{Nexus, ScsiPort, ScsiTarget};

/// The iSCSI front end over IOServer `S`, serving SCSI target `T` (the
/// daemon's `sanvirt_scsi::ScsiTarget<S>`).
///
/// Buffers: Data-Out is received into [`sanvirt_facility::Buffer`]s from
/// `pool` and moved into the SCSI task; Data-In is sent from the buffer the
/// SCSI layer hands back. The front end never copies host data.
pub struct IscsiFrontEnd<S: IoServer, T: ScsiPort = ScsiTarget<S>> {
    server: S,
    target: Arc<T>,
    pool: Arc<BufferPool>,
    config: IscsiConfig,
    sessions: Mutex<HashMap<(String, [u8; 6]), SessionEntry>>,
    next_tsih: AtomicU16,
    /// This target port's relative port id and port group (the config's,
    /// until [`IscsiFrontEnd::set_target_port`] changes them).
    port: std::sync::atomic::AtomicU32,
    shutdown: Arc<watch::Sender<bool>>,
}

struct SessionEntry {
    tsih: u16,
    kill: Arc<watch::Sender<bool>>,
    done: watch::Receiver<bool>,
}

/// Stops a running front end: listeners stop accepting, logins end,
/// connections stop reading, finish what is in flight, and close.
#[derive(Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}

/// A session's summary (for the admin surface and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub tsih: u16,
}

impl<S: IoServer, T: ScsiPort> IscsiFrontEnd<S, T> {
    /// Builds the front end and binds it as `server`'s IOClient: the disk
    /// and path events it receives go to `target`.
    pub fn try_new(
        server: S,
        pool: Arc<BufferPool>,
        config: IscsiConfig,
        target: Arc<T>,
    ) -> Result<Arc<Self>, ConfigError> {
        config.validate()?;
        let port =
            (u32::from(config.relative_target_port) << 16) | u32::from(config.target_port_group);
        let (tx, _) = watch::channel(false);
        let fe = Arc::new(IscsiFrontEnd {
            server,
            target,
            pool,
            config,
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            port: std::sync::atomic::AtomicU32::new(port),
            shutdown: Arc::new(tx),
        });
        let client: Arc<dyn IoClient> = fe.clone();
        let weak: Weak<dyn IoClient> = Arc::downgrade(&client);
        drop(client);
        fe.server.bind_client(weak);
        Ok(fe)
    }

    /// # Panics
    /// If `config` is invalid.
    pub fn new(server: S, pool: Arc<BufferPool>, config: IscsiConfig, target: Arc<T>) -> Arc<Self> {
        match Self::try_new(server, pool, config, target) {
            Ok(fe) => fe,
            Err(e) => panic!("invalid iSCSI configuration: {e}"),
        }
    }

    pub fn server(&self) -> &S {
        &self.server
    }
    pub fn target(&self) -> &Arc<T> {
        &self.target
    }
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }
    pub fn config(&self) -> &IscsiConfig {
        &self.config
    }

    /// Sets this port's relative target port id and target port group
    /// (ALUA) for sessions that log in from now on: a node's ids follow
    /// its cluster node id, which a node added after it started learns
    /// late.
    pub fn set_target_port(&self, relative_target_port: u16, target_port_group: u16) {
        self.port.store(
            (u32::from(relative_target_port) << 16) | u32::from(target_port_group),
            Ordering::Relaxed,
        );
    }

    pub fn sessions(&self) -> Vec<SessionSummary> {
        self.sessions
            .lock()
            .iter()
            .map(|((name, isid), e)| SessionSummary {
                initiator_name: name.clone(),
                isid: *isid,
                tsih: e.tsih,
            })
            .collect()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.shutdown.clone(),
        }
    }

    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Binds `addr` and serves until shut down.
    pub async fn run(self: &Arc<Self>, addr: impl ToSocketAddrs) -> io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, target = %self.config.target_name, "iSCSI front end listening");
        self.serve(listener).await
    }

    /// Serves initiators from `listener` until shut down, then waits (at
    /// most `shutdown_grace`) for every connection to finish.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.config.connections_max));
        let mut tasks = JoinSet::new();
        let mut stop = pin!(self.stopped());
        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut stop => break,
            };
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = &mut stop => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let fe = self.clone();
            tasks.spawn(async move {
                fe.connection(stream, peer).await;
                drop(permit);
            });
        }
        drop(listener);
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = tasks.len(),
                "iSCSI connections still busy after the grace period: dropping them"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        Ok(())
    }

    fn portal_string(&self, local: Option<SocketAddr>) -> String {
        let addr = self.config.portal.or(local);
        let tag = self.config.portal_group_tag;
        match addr {
            Some(SocketAddr::V4(a)) => format!("{}:{},{tag}", a.ip(), a.port()),
            Some(SocketAddr::V6(a)) => format!("[{}]:{},{tag}", a.ip(), a.port()),
            None => format!("0.0.0.0:3260,{tag}"),
        }
    }

    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY");
        }
        let mut stat_sn: u32 = rand::random::<u32>() & 0x00ff_ffff;
        let login = tokio::select! {
            r = tokio::time::timeout(self.config.login_timeout, self.login(&mut stream, &mut stat_sn)) => r,
            _ = self.stopped() => return,
        };
        let (done, tsih, kill) = match login {
            Ok(Ok(Some(d))) => d,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "login failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "login timed out");
                return;
            }
        };
        let discovery = done.session_type == SessionType::Discovery;
        let nexus = Arc::new(Nexus {
            initiator_name: done.initiator_name.as_str().into(),
            initiator_port: format!(
                "{},i,0x{}",
                done.initiator_name,
                done.isid
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
            .into(),
            relative_target_port: (self.port.load(Ordering::Relaxed) >> 16) as u16,
            target_port_group: self.port.load(Ordering::Relaxed) as u16,
        });
        tracing::info!(%peer, initiator = %done.initiator_name, tsih, discovery, "session in full feature phase");
        let ctx = ConnContext {
            target_name: self.config.target_name.clone(),
            target_address: self.portal_string(stream.local_addr().ok()),
            cid: done.cid,
            discovery,
            data_out_timeout: self.config.data_out_timeout,
            nop_interval: self.config.nop_interval,
            nop_timeout: self.config.nop_timeout,
        };
        let kill_rx = kill.as_ref().map(|(k, _)| k.subscribe());
        let shutdown = async move {
            let mut k = kill_rx;
            tokio::select! {
                _ = self.stopped() => {}
                _ = async {
                    match k.as_mut() {
                        Some(k) => { let _ = k.wait_for(|v| *v).await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
            }
        };
        let reason = {
            let mut c = Connection::new(
                &*self.target,
                exec::<T>,
                &stream,
                &self.pool,
                &ctx,
                nexus.clone(),
                done.params,
                stat_sn,
                done.cmd_sn,
                Box::pin(shutdown),
            );
            poll_fn(|cx| c.poll(cx)).await;
            c.end_reason
        };
        tracing::info!(%peer, initiator = %done.initiator_name, reason, "session ended");
        if let Some((_, done_tx)) = kill {
            self.target.nexus_lost(&nexus);
            let key = (done.initiator_name.to_ascii_lowercase(), done.isid);
            let mut s = self.sessions.lock();
            if s.get(&key).is_some_and(|e| e.tsih == tsih) {
                s.remove(&key);
            }
            drop(s);
            done_tx.send_replace(true);
        }
    }

    fn new_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Runs the login phase. `Ok(None)`: refused (the response was sent).
    #[allow(clippy::type_complexity)]
    async fn login(
        &self,
        stream: &mut TcpStream,
        stat_sn: &mut u32,
    ) -> io::Result<
        Option<(
            LoginDone,
            u16,
            Option<(Arc<watch::Sender<bool>>, watch::Sender<bool>)>,
        )>,
    > {
        let ctx = LoginContext {
            target_name: self.config.target_name.clone(),
            target_alias: self.config.target_alias.clone(),
            portal_group_tag: self.config.portal_group_tag,
            offer: self.config.offer.clone(),
            auth: self.config.auth.clone(),
        };
        let mut challenge = [0u8; CHAP_CHALLENGE_BYTES];
        for b in challenge.iter_mut() {
            *b = rand::random();
        }
        let mut m = LoginMachine::new(ctx, rand::random(), challenge);
        let mut hdr = [0u8; BHS_BYTES];
        let mut data = Vec::new();
        loop {
            stream.read_exact(&mut hdr).await?;
            let bhs = Bhs::parse(&hdr).expect("48 bytes");
            if bhs.opcode != op::LOGIN_REQ {
                return Err(io::Error::other("a non-login PDU during login"));
            }
            let dlen = bhs.data_len as usize;
            if dlen > TEXT_BYTES_MAX || bhs.ahs_len > 0 {
                return Err(io::Error::other("oversized login PDU"));
            }
            data.resize(pdu::padded(bhs.data_len), 0);
            stream.read_exact(&mut data).await?;
            data.truncate(dlen);
            let req = match Request::parse(&bhs) {
                Ok(Request::Login(r)) => r,
                _ => return Err(io::Error::other("malformed login request")),
            };
            let step = if req.tsih != 0 {
                // MaxConnections=1 and no session survives its connection
                // (ErrorRecoveryLevel 0): the initiator must start anew.
                self.end_session_by_tsih(req.tsih);
                let mut r = m.step(&req, &data);
                let (Step::Fail(rep) | Step::Continue(rep) | Step::Done(rep, _)) = &mut r;
                rep.rsp.status = login_status::NO_SUCH_SESSION;
                rep.rsp.transit = false;
                rep.data.clear();
                rep.rsp.data_len = 0;
                match r {
                    Step::Fail(rep) | Step::Continue(rep) | Step::Done(rep, _) => Step::Fail(rep),
                }
            } else {
                m.step(&req, &data)
            };
            let window = TASKS_MAX as u32;
            let seq = |s: u32| Seq {
                stat_sn: s,
                exp_cmd_sn: req.cmd_sn,
                max_cmd_sn: req.cmd_sn.wrapping_add(window - 1),
            };
            match step {
                Step::Continue(mut rep) => {
                    rep.rsp.seq = seq(*stat_sn);
                    send_login(stream, &rep.rsp, &rep.data).await?;
                }
                Step::Fail(mut rep) => {
                    rep.rsp.seq = seq(*stat_sn);
                    send_login(stream, &rep.rsp, &rep.data).await?;
                    stream.shutdown().await.ok();
                    return Ok(None);
                }
                Step::Done(mut rep, done) => {
                    let tsih = self.new_tsih();
                    let kill = if done.session_type == SessionType::Normal {
                        Some(self.reinstate(&done, tsih).await)
                    } else {
                        None
                    };
                    rep.rsp.tsih = tsih;
                    rep.rsp.seq = seq(*stat_sn);
                    *stat_sn = stat_sn.wrapping_add(1);
                    send_login(stream, &rep.rsp, &rep.data).await?;
                    return Ok(Some((*done, tsih, kill)));
                }
            }
        }
    }

    fn end_session_by_tsih(&self, tsih: u16) {
        let s = self.sessions.lock();
        for e in s.values().filter(|e| e.tsih == tsih) {
            e.kill.send_replace(true);
        }
    }

    /// Registers the new session; an old one of the same initiator name and
    /// ISID is closed first and waited for (session reinstatement).
    async fn reinstate(
        &self,
        done: &LoginDone,
        tsih: u16,
    ) -> (Arc<watch::Sender<bool>>, watch::Sender<bool>) {
        let key = (done.initiator_name.to_ascii_lowercase(), done.isid);
        let old = self.sessions.lock().get(&key).map(|e| {
            e.kill.send_replace(true);
            e.done.clone()
        });
        if let Some(mut d) = old {
            tracing::info!(initiator = %done.initiator_name, "session reinstatement: closing the old session");
            let waited =
                tokio::time::timeout(Duration::from_secs(REINSTATE_WAIT_S), d.wait_for(|v| *v))
                    .await;
            if waited.is_err() {
                tracing::warn!(initiator = %done.initiator_name, "old session did not end in time");
            }
        }
        let (kill, _) = watch::channel(false);
        let kill = Arc::new(kill);
        let (done_tx, done_rx) = watch::channel(false);
        self.sessions.lock().insert(
            key,
            SessionEntry {
                tsih,
                kill: kill.clone(),
                done: done_rx,
            },
        );
        (kill, done_tx)
    }
}

async fn send_login(
    stream: &mut TcpStream,
    rsp: &pdu::LoginResponse,
    data: &[u8],
) -> io::Result<()> {
    let mut b = [0u8; BHS_BYTES];
    let mut rsp = *rsp;
    rsp.data_len = data.len() as u32;
    rsp.encode(&mut b);
    let mut out = Vec::with_capacity(BHS_BYTES + pdu::padded(data.len() as u32));
    out.extend_from_slice(&b);
    out.extend_from_slice(data);
    out.resize(BHS_BYTES + pdu::padded(data.len() as u32), 0);
    stream.write_all(&out).await
}

impl<S: IoServer, T: ScsiPort> IoClient for IscsiFrontEnd<S, T> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        if event.node == self.config.node {
            self.target.disk_path_event(&event);
        }
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        self.target.disk_event(&event);
    }
}
