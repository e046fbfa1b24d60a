//! A blocking HTTP client for the admin API. Plain `http` only: the API
//! listens on loopback by default.

use std::time::Duration;

use sanvirt_admin::ErrorBody;
use serde_json::Value;

/// Connecting to a local daemon is immediate; anything longer means it is
/// not there.
const CONNECT_TIMEOUT_S: u64 = 5;
/// A command waits for its journal fsync; a stuck disk should still end.
const REQUEST_TIMEOUT_S: u64 = 120;

/// Why a request did not succeed, and so the exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or local set-up (exit 2).
    Usage(String),
    /// sanvirtd answered with a refusal (exit 1); nothing changed. `change`:
    /// the request asked for a change (so say that none happened).
    Refused { body: ErrorBody, change: bool },
    /// sanvirtd is not reachable, failed, or answered nonsense (exit 3).
    Daemon(String),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Refused { .. } => 1,
            Failure::Usage(_) => 2,
            Failure::Daemon(_) => 3,
        }
    }
}

pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// Percent-encodes one path segment (object names travel in URLs).
pub fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(api: &str, token: String) -> Result<Client, Failure> {
        let base = api.trim_end_matches('/').to_string();
        if base.starts_with("https://") {
            return Err(Failure::Usage(format!(
                "--api {api}: https is not supported; sanvirtd's admin API speaks plain http \
                 (on loopback by default)"
            )));
        }
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(Failure::Usage(format!(
                "--api {api}: expected a URL like {}",
                sanvirt_admin::API_URL_DEFAULT
            )));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(CONNECT_TIMEOUT_S))
            .timeout(Duration::from_secs(REQUEST_TIMEOUT_S))
            .build();
        Ok(Client { base, token, agent })
    }

    pub fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.send("POST", path, Some(body))
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.send("PUT", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.send("DELETE", path, None)
    }

    /// The response's JSON (`Null` for 204 No Content).
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let req = self
            .agent
            .request(method, &url)
            .set("Authorization", &format!("Bearer {}", self.token));
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match result {
            Ok(resp) if resp.status() == 204 => Ok(Value::Null),
            Ok(resp) => resp.into_json().map_err(|e| {
                Failure::Daemon(format!(
                    "sanvirtd at {} sent an unreadable answer: {e}",
                    self.base
                ))
            }),
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
                match (status, body) {
                    (401, _) => Err(Failure::Refused {
                        body: unauthorized(),
                        change: method != "GET",
                    }),
                    (400..=499, Some(body)) => Err(Failure::Refused {
                        body,
                        change: method != "GET",
                    }),
                    // The cluster cannot commit now: nothing is wrong with
                    // the request, and the same request can succeed later.
                    (503, Some(body))
                        if matches!(body.error.as_str(), "no_quorum" | "cluster_unavailable") =>
                    {
                        Err(Failure::Daemon(format!(
                            "{}; try again later",
                            body.message
                        )))
                    }
                    (_, Some(body)) => Err(Failure::Daemon(format!(
                        "sanvirtd failed ({status}): {}",
                        body.message
                    ))),
                    (_, None) => Err(Failure::Daemon(format!(
                        "{url} answered {status}: {}; is --api pointing at sanvirtd?",
                        text.trim()
                    ))),
                }
            }
            Err(ureq::Error::Transport(t)) => Err(Failure::Daemon(format!(
                "cannot reach sanvirtd at {}: is it running? ({t})",
                self.base
            ))),
        }
    }
}

fn unauthorized() -> ErrorBody {
    ErrorBody {
        error: "unauthorized".into(),
        message: "sanvirtd refused the API token: pass the token from sanvirtd's token file \
                  with --token-file (default ./data/api-token), --token or SANVIRT_TOKEN"
            .into(),
        fields: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_as_one_segment() {
        assert_eq!(segment("md0"), "md0");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(segment("é"), "%C3%A9");
        assert_eq!(segment(".."), "..");
    }

    #[test]
    fn only_plain_http_urls() {
        assert!(Client::new("http://127.0.0.1:7480/", "t".into()).is_ok());
        for bad in ["https://x", "127.0.0.1:7480", "http://", "ftp://x"] {
            assert!(
                matches!(Client::new(bad, "t".into()), Err(Failure::Usage(_))),
                "{bad}"
            );
        }
    }
}
