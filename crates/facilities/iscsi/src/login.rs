//! The login phase (RFC 7143 §6, §13) as a deterministic state machine:
//! login request in, login response out. No sockets, no clock, no
//! randomness of its own (the CHAP identifier and challenge are handed in),
//! so every transition is unit-tested.

use std::sync::Arc;

use md5::{Digest, Md5};

use crate::config::{Authenticator, ChapConfig, Offer};
use crate::limits::*;
use crate::pdu::{login_status as st, LoginRequest, LoginResponse, Seq};
use crate::text::{self, parse_binary, parse_bool, parse_number, yes_no, Continued, Pairs, Piece};

/// Login stages (CSG/NSG values).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// Session parameters in force after login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// What we accept in one data segment (declared by us).
    pub max_recv_data_segment_bytes: u32,
    /// What the initiator accepts in one data segment (declared by it).
    pub max_xmit_data_segment_bytes: u32,
    pub max_burst_bytes: u32,
    pub first_burst_bytes: u32,
    pub max_outstanding_r2t: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub default_time2wait_s: u16,
    pub default_time2retain_s: u16,
}

impl Negotiated {
    /// RFC 7143 defaults, before any key is negotiated.
    pub fn defaults(offer: &Offer) -> Negotiated {
        Negotiated {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_bytes: offer.max_recv_data_segment_bytes,
            max_xmit_data_segment_bytes: 8192,
            max_burst_bytes: 262144.min(offer.max_burst_bytes),
            first_burst_bytes: 65536.min(offer.first_burst_bytes),
            max_outstanding_r2t: 1,
            immediate_data: offer.immediate_data,
            initial_r2t: true,
            default_time2wait_s: 2,
            default_time2retain_s: 0,
        }
    }
}

/// What the login machine knows about the target.
#[derive(Clone)]
pub struct LoginContext {
    pub target_name: String,
    pub target_alias: Option<String>,
    pub portal_group_tag: u16,
    pub offer: Offer,
    pub auth: Arc<dyn Authenticator>,
}

/// The outcome of a successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginDone {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub isid: [u8; 6],
    pub cid: u16,
    pub params: Negotiated,
    /// CmdSN of the login request: the session's first ExpCmdSN.
    pub cmd_sn: u32,
}

/// What to send back for one login request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Header fields except the sequence numbers and TSIH (the caller's).
    pub rsp: LoginResponse,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the reply, wait for the next request.
    Continue(Reply),
    /// Send the reply (a failure status), then close the connection.
    Fail(Reply),
    /// Send the reply (transit to full feature phase) once the caller has
    /// assigned the TSIH, then enter full feature phase.
    Done(Reply, Box<LoginDone>),
}

#[derive(Debug, Clone)]
enum Auth {
    /// No AuthMethod decided yet.
    Start,
    /// CHAP chosen, waiting for CHAP_A.
    ChapChosen(ChapConfig),
    /// Challenge sent, waiting for CHAP_N/CHAP_R.
    Challenged(ChapConfig),
    Done,
}

pub struct LoginMachine {
    ctx: LoginContext,
    chap_id: u8,
    challenge: [u8; CHAP_CHALLENGE_BYTES],
    first: Option<LoginRequest>,
    stage: u8,
    pdus: usize,
    /// Login text continued over several PDUs (C bit).
    pending: Continued,
    /// The first complete set of pairs (who logs in, to what) is taken.
    identified: bool,
    session_type: SessionType,
    initiator_name: String,
    initiator_alias: Option<String>,
    auth: Auth,
    params: Negotiated,
    /// Our declarations still to be sent in the operational stage.
    declared: bool,
}

impl std::fmt::Debug for LoginMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginMachine")
            .field("stage", &self.stage)
            .field("initiator_name", &self.initiator_name)
            .field("session_type", &self.session_type)
            .finish_non_exhaustive()
    }
}

/// CHAP response value: MD5(identifier || secret || challenge) (RFC 1994).
pub fn chap_md5(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    Md5::new()
        .chain_update([id])
        .chain_update(secret)
        .chain_update(challenge)
        .finalize()
        .into()
}

/// Constant-time comparison of equal-length byte strings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

enum KeyAnswer {
    /// Nothing to say (declarative key taken).
    Silent,
    Value(String),
}

impl LoginMachine {
    /// `chap_id` and `challenge` must come from a good random source; they
    /// are used only if the initiator has to authenticate.
    pub fn new(ctx: LoginContext, chap_id: u8, challenge: [u8; CHAP_CHALLENGE_BYTES]) -> Self {
        let params = Negotiated::defaults(&ctx.offer);
        LoginMachine {
            ctx,
            chap_id,
            challenge,
            first: None,
            stage: STAGE_SECURITY,
            pdus: 0,
            pending: Continued::default(),
            identified: false,
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            auth: Auth::Start,
            params,
            declared: false,
        }
    }

    pub fn initiator_name(&self) -> &str {
        &self.initiator_name
    }

    fn reply(
        &self,
        req: &LoginRequest,
        transit: bool,
        nsg: u8,
        status: u16,
        data: Vec<u8>,
    ) -> Reply {
        Reply {
            rsp: LoginResponse {
                transit,
                cont: false,
                csg: req.csg.min(STAGE_OPERATIONAL),
                nsg: if transit { nsg } else { 0 },
                isid: req.isid,
                tsih: 0,
                itt: req.itt,
                status,
                data_len: data.len() as u32,
                seq: Seq::default(),
            },
            data,
        }
    }

    fn fail(&self, req: &LoginRequest, status: u16, why: &str) -> Step {
        tracing::info!(
            initiator = %self.initiator_name,
            status = format_args!("{status:#06x}"),
            why,
            "login refused"
        );
        Step::Fail(self.reply(req, false, 0, status, Vec::new()))
    }

    /// Handles one login request PDU with its data segment.
    pub fn step(&mut self, req: &LoginRequest, data: &[u8]) -> Step {
        self.pdus += 1;
        if self.pdus > LOGIN_PDUS_MAX {
            return self.fail(req, st::INITIATOR_ERROR, "too many login PDUs");
        }
        match &self.first {
            None => {
                if req.version_min > 0 {
                    return self.fail(req, st::UNSUPPORTED_VERSION, "version");
                }
                if req.tsih != 0 {
                    return self.fail(req, st::NO_SUCH_SESSION, "adding a connection to a session");
                }
                self.first = Some(*req);
            }
            Some(f) => {
                if f.isid != req.isid || f.tsih != req.tsih || f.cid != req.cid {
                    return self.fail(
                        req,
                        st::INITIATOR_ERROR,
                        "ISID/TSIH/CID changed during login",
                    );
                }
            }
        }
        if req.csg == 2 || req.csg == STAGE_FULL_FEATURE || req.csg < self.stage {
            return self.fail(req, st::INITIATOR_ERROR, "invalid current stage");
        }
        if req.cont && req.transit {
            // RFC 7143 §11.12.2: a continued request must not transit.
            return self.fail(
                req,
                st::INITIATOR_ERROR,
                "login request with both C and T bits",
            );
        }
        // One exchange per login (ISID, TSIH and CID are checked above;
        // initiators may change the ITT between login requests).
        let text = match self.pending.push(0, req.cont, data) {
            // More text follows: acknowledge with an empty response.
            Ok(Piece::More) => {
                return Step::Continue(self.reply(req, false, 0, st::SUCCESS, Vec::new()))
            }
            Ok(Piece::Whole(t)) => t,
            Err(e) => {
                tracing::info!(error = %e, "continued login text refused");
                return self.fail(req, st::INITIATOR_ERROR, "login text too long");
            }
        };
        let pairs = match text::parse(&text) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(error = %e, "bad login text");
                return self.fail(req, st::INITIATOR_ERROR, "malformed text");
            }
        };
        // The first set of pairs, which may have taken several PDUs.
        let first_pdu = !self.identified;
        self.identified = true;
        if first_pdu {
            if let Some(s) = self.identify(req, &pairs) {
                return s;
            }
        } else if pairs
            .get("InitiatorName")
            .is_some_and(|n| n != self.initiator_name)
            || pairs.get("SessionType").is_some_and(|t| {
                (t == "Discovery") != (self.session_type == SessionType::Discovery)
            })
        {
            return self.fail(
                req,
                st::INITIATOR_ERROR,
                "identity keys changed during login",
            );
        }
        if req.csg > self.stage {
            // Skipping the security stage is allowed only without auth.
            if self.needs_auth().is_some() && !matches!(self.auth, Auth::Done) {
                return self.fail(req, st::AUTH_FAILED, "authentication required");
            }
            self.auth = Auth::Done;
            self.stage = req.csg;
        }
        let mut out = Vec::new();
        if first_pdu && self.session_type == SessionType::Normal {
            text::push(
                &mut out,
                "TargetPortalGroupTag",
                &self.ctx.portal_group_tag.to_string(),
            );
            if let Some(a) = &self.ctx.target_alias {
                text::push(&mut out, "TargetAlias", a);
            }
        }
        let ready = if self.stage == STAGE_SECURITY {
            match self.security(req, &pairs, &mut out) {
                Ok(ready) => ready,
                Err(s) => return s,
            }
        } else {
            true
        };
        if let Err(s) = self.operational(req, &pairs, &mut out) {
            return s;
        }
        if self.stage == STAGE_OPERATIONAL && !self.declared {
            self.declare(&mut out);
        }
        if out.len() > self.params.max_xmit_data_segment_bytes.max(8192) as usize {
            return self.fail(req, st::TARGET_ERROR, "login response too long");
        }
        if !(req.transit && ready) {
            return Step::Continue(self.reply(req, false, 0, st::SUCCESS, out));
        }
        match (self.stage, req.nsg) {
            (STAGE_SECURITY, STAGE_OPERATIONAL) => {
                self.stage = STAGE_OPERATIONAL;
                let r = self.reply(req, true, STAGE_OPERATIONAL, st::SUCCESS, out);
                Step::Continue(r)
            }
            (STAGE_SECURITY | STAGE_OPERATIONAL, STAGE_FULL_FEATURE) => {
                let mut p = self.params;
                p.first_burst_bytes = p.first_burst_bytes.min(p.max_burst_bytes);
                let done = LoginDone {
                    session_type: self.session_type,
                    initiator_name: self.initiator_name.clone(),
                    initiator_alias: self.initiator_alias.clone(),
                    isid: req.isid,
                    cid: req.cid,
                    params: p,
                    cmd_sn: req.cmd_sn,
                };
                let r = self.reply(req, true, STAGE_FULL_FEATURE, st::SUCCESS, out);
                Step::Done(r, Box::new(done))
            }
            _ => self.fail(req, st::INITIATOR_ERROR, "invalid next stage"),
        }
    }

    /// First PDU: who is logging in, to what.
    fn identify(&mut self, req: &LoginRequest, pairs: &Pairs) -> Option<Step> {
        let Some(name) = pairs.get("InitiatorName") else {
            return Some(self.fail(req, st::MISSING_PARAMETER, "no InitiatorName"));
        };
        if name.is_empty() || name.len() > NAME_BYTES_MAX {
            return Some(self.fail(req, st::INITIATOR_ERROR, "bad InitiatorName"));
        }
        self.initiator_name = name.to_string();
        self.initiator_alias = pairs
            .get("InitiatorAlias")
            .map(|a| a.chars().take(NAME_BYTES_MAX).collect());
        self.session_type = match pairs.get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => {
                return Some(self.fail(req, st::SESSION_TYPE_UNSUPPORTED, "unknown SessionType"))
            }
        };
        if self.session_type == SessionType::Normal {
            let Some(t) = pairs.get("TargetName") else {
                return Some(self.fail(req, st::MISSING_PARAMETER, "no TargetName"));
            };
            if !t.eq_ignore_ascii_case(&self.ctx.target_name) {
                return Some(self.fail(req, st::NOT_FOUND, "unknown TargetName"));
            }
            if !self.ctx.auth.allowed(name) {
                return Some(self.fail(req, st::FORBIDDEN, "initiator not allowed"));
            }
        }
        None
    }

    fn needs_auth(&self) -> Option<ChapConfig> {
        if self.session_type == SessionType::Discovery && !self.ctx.auth.discovery_auth() {
            return None;
        }
        self.ctx.auth.chap_for(&self.initiator_name)
    }

    /// Security stage keys. Ok(true): authentication complete.
    fn security(
        &mut self,
        req: &LoginRequest,
        pairs: &Pairs,
        out: &mut Vec<u8>,
    ) -> Result<bool, Step> {
        let auth_fail = |m: &Self, why: &str| m.fail(req, st::AUTH_FAILED, why);
        match std::mem::replace(&mut self.auth, Auth::Done) {
            Auth::Start => {
                let methods: Vec<&str> = pairs
                    .get("AuthMethod")
                    .map(|v| v.split(',').collect())
                    .unwrap_or_default();
                match self.needs_auth() {
                    Some(cfg) => {
                        if !methods.contains(&"CHAP") {
                            return Err(auth_fail(self, "CHAP required, not offered"));
                        }
                        text::push(out, "AuthMethod", "CHAP");
                        self.auth = Auth::ChapChosen(cfg);
                        Ok(false)
                    }
                    None => {
                        if methods.is_empty() {
                            self.auth = Auth::Done;
                            return Ok(true);
                        }
                        if !methods.contains(&"None") {
                            return Err(auth_fail(self, "no credentials for the offered methods"));
                        }
                        text::push(out, "AuthMethod", "None");
                        self.auth = Auth::Done;
                        Ok(true)
                    }
                }
            }
            Auth::ChapChosen(cfg) => {
                let algs = pairs.get("CHAP_A").unwrap_or("");
                if !algs.split(',').any(|a| a == "5") {
                    return Err(auth_fail(self, "CHAP_A without MD5 (5)"));
                }
                text::push(out, "CHAP_A", "5");
                text::push(out, "CHAP_I", &self.chap_id.to_string());
                text::push(out, "CHAP_C", &text::hex(&self.challenge));
                self.auth = Auth::Challenged(cfg);
                Ok(false)
            }
            Auth::Challenged(cfg) => {
                let (Some(n), Some(r)) = (pairs.get("CHAP_N"), pairs.get("CHAP_R")) else {
                    return Err(auth_fail(self, "CHAP_N or CHAP_R missing"));
                };
                if n.len() > CHAP_NAME_BYTES_MAX || n != cfg.user {
                    return Err(auth_fail(self, "wrong CHAP_N"));
                }
                let Some(r) = parse_binary(r, 16).filter(|r| r.len() == 16) else {
                    return Err(auth_fail(self, "malformed CHAP_R"));
                };
                let want = chap_md5(self.chap_id, cfg.secret.expose(), &self.challenge);
                if !same(&r, &want) {
                    return Err(auth_fail(self, "wrong CHAP_R"));
                }
                match (pairs.get("CHAP_I"), pairs.get("CHAP_C")) {
                    (None, None) => {}
                    (Some(i), Some(c)) => {
                        let Some((tuser, tsecret)) = &cfg.mutual else {
                            return Err(auth_fail(self, "mutual CHAP asked, not configured"));
                        };
                        if same(tsecret.expose(), cfg.secret.expose()) {
                            return Err(auth_fail(
                                self,
                                "mutual CHAP secret equals the initiator's",
                            ));
                        }
                        let Some(id) = parse_number(i, 0, 255) else {
                            return Err(auth_fail(self, "bad CHAP_I"));
                        };
                        let Some(c) = parse_binary(c, CHAP_CHALLENGE_BYTES_MAX) else {
                            return Err(auth_fail(self, "bad CHAP_C"));
                        };
                        if same(&c, &self.challenge) {
                            return Err(auth_fail(self, "reflected CHAP challenge"));
                        }
                        let rsp = chap_md5(id as u8, tsecret.expose(), &c);
                        text::push(out, "CHAP_N", tuser);
                        text::push(out, "CHAP_R", &text::hex(&rsp));
                    }
                    _ => return Err(auth_fail(self, "CHAP_I without CHAP_C or the reverse")),
                }
                tracing::info!(initiator = %self.initiator_name, "CHAP authentication succeeded");
                self.auth = Auth::Done;
                Ok(true)
            }
            Auth::Done => {
                if pairs
                    .iter()
                    .any(|(k, _)| k.starts_with("CHAP_") || k == "AuthMethod")
                {
                    return Err(auth_fail(self, "authentication keys after authentication"));
                }
                Ok(true)
            }
        }
    }

    fn declare(&mut self, out: &mut Vec<u8>) {
        self.declared = true;
        text::push(
            out,
            "MaxRecvDataSegmentLength",
            &self.params.max_recv_data_segment_bytes.to_string(),
        );
    }

    /// Operational keys (accepted in either stage, as initiators send them).
    fn operational(
        &mut self,
        req: &LoginRequest,
        pairs: &Pairs,
        out: &mut Vec<u8>,
    ) -> Result<(), Step> {
        let mut any = false;
        for (k, v) in pairs.iter() {
            let answer = match self.key(k, v) {
                Ok(a) => a,
                Err(status) => return Err(self.fail(req, status, "key")),
            };
            if let KeyAnswer::Value(a) = answer {
                text::push(out, k, &a);
                any = true;
            }
        }
        if any && !self.declared {
            self.declare(out);
        }
        Ok(())
    }

    fn key(&mut self, k: &str, v: &str) -> Result<KeyAnswer, u16> {
        use KeyAnswer::*;
        let offer = &self.ctx.offer;
        let p = &mut self.params;
        let num = |min: u64, max: u64| parse_number(v, min, max);
        let reject = || Value("Reject".into());
        Ok(match k {
            "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => Silent,
            "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => Silent,
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => Value("Irrelevant".into()),
            "HeaderDigest" | "DataDigest" => {
                let allowed = if k == "HeaderDigest" {
                    offer.header_digest
                } else {
                    offer.data_digest
                };
                let pick = v
                    .split(',')
                    .find(|m| *m == "None" || (*m == "CRC32C" && allowed));
                match pick {
                    Some(m) => {
                        let on = m == "CRC32C";
                        if k == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        Value(m.into())
                    }
                    None => reject(),
                }
            }
            "MaxRecvDataSegmentLength" => match num(512, DATA_SEGMENT_BYTES_PROTOCOL_MAX as u64) {
                Some(n) => {
                    p.max_xmit_data_segment_bytes = n as u32;
                    Silent
                }
                None => reject(),
            },
            "MaxBurstLength" => match num(512, DATA_SEGMENT_BYTES_PROTOCOL_MAX as u64) {
                Some(n) => {
                    p.max_burst_bytes = (n as u32).min(offer.max_burst_bytes);
                    Value(p.max_burst_bytes.to_string())
                }
                None => reject(),
            },
            "FirstBurstLength" => match num(512, DATA_SEGMENT_BYTES_PROTOCOL_MAX as u64) {
                Some(n) => {
                    p.first_burst_bytes = (n as u32).min(offer.first_burst_bytes);
                    Value(p.first_burst_bytes.to_string())
                }
                None => reject(),
            },
            "MaxOutstandingR2T" => match num(1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = (n as u32).min(offer.max_outstanding_r2t);
                    Value(p.max_outstanding_r2t.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Wait" => match num(0, 3600) {
                Some(n) => {
                    p.default_time2wait_s = (n as u16).max(offer.default_time2wait_s);
                    Value(p.default_time2wait_s.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Retain" => match num(0, 3600) {
                Some(n) => {
                    p.default_time2retain_s = (n as u16).min(offer.default_time2retain_s);
                    Value(p.default_time2retain_s.to_string())
                }
                None => reject(),
            },
            "ErrorRecoveryLevel" => match num(0, 2) {
                Some(_) => Value("0".into()),
                None => reject(),
            },
            "MaxConnections" => match num(1, 65535) {
                Some(_) => Value("1".into()),
                None => reject(),
            },
            "InitialR2T" => match parse_bool(v) {
                Some(b) => {
                    p.initial_r2t = b || offer.initial_r2t;
                    Value(yes_no(p.initial_r2t).into())
                }
                None => reject(),
            },
            "ImmediateData" => match parse_bool(v) {
                Some(b) => {
                    p.immediate_data = b && offer.immediate_data;
                    Value(yes_no(p.immediate_data).into())
                }
                None => reject(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(v) {
                Some(_) => Value("Yes".into()),
                None => reject(),
            },
            "IFMarker" | "OFMarker" => match parse_bool(v) {
                Some(_) => Value("No".into()),
                None => reject(),
            },
            "IFMarkInt" | "OFMarkInt" => Value("Irrelevant".into()),
            _ => Value("NotUnderstood".into()),
        })
    }
}

#[cfg(test)]
mod tests;
