//! The API over HTTP requests (in process, `tower::ServiceExt::oneshot`),
//! against the in-memory fake service.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::fake::FakeService;
use crate::{router, AdminService};

const TOKEN: &str = "0123456789abcdef-test-token";

struct Api {
    router: Router,
    svc: Arc<FakeService>,
    dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    json: Value,
    headers: axum::http::HeaderMap,
}

impl Api {
    fn new() -> Self {
        Self::with(FakeService::new())
    }

    fn with(svc: FakeService) -> Self {
        let svc = Arc::new(svc);
        Api {
            router: router(svc.clone(), TOKEN.into()),
            svc,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_string_lossy().into_owned()
    }

    async fn raw(&self, method: Method, uri: &str, body: Vec<u8>, auth: Option<&str>) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "non-JSON response ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Reply {
            status,
            json,
            headers,
        }
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.raw(method, uri, bytes, Some(&format!("Bearer {TOKEN}")))
            .await
    }

    async fn get(&self, uri: &str) -> Reply {
        self.call(Method::GET, uri, None).await
    }

    async fn post(&self, uri: &str, body: Value) -> Reply {
        self.call(Method::POST, uri, Some(body)).await
    }

    async fn delete(&self, uri: &str) -> Reply {
        self.call(Method::DELETE, uri, None).await
    }

    /// Two 1 GiB mdisks in pool p0 (16 MiB extents: 64 each).
    async fn pool_with_two_mdisks(&self) {
        for md in ["md0", "md1"] {
            let r = self
                .post(
                    "/v1/mdisks",
                    json!({"name": md, "path": self.path(md), "create_size_bytes": 1u64 << 30}),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
        }
        let r = self.post("/v1/pools", json!({"name": "p0"})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
        for md in ["md0", "md1"] {
            let r = self.post("/v1/pools/p0/mdisks", json!({"mdisk": md})).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.json);
        }
    }
}

fn assert_error(r: &Reply, status: StatusCode, kind: &str) {
    assert_eq!(r.status, status, "{}", r.json);
    assert_eq!(r.json["error"], kind, "{}", r.json);
    assert!(
        r.json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.json
    );
}

#[tokio::test]
async fn every_endpoint_but_openapi_needs_the_token() {
    let api = Api::new();
    for (method, uri) in [
        (Method::GET, "/v1/status"),
        (Method::GET, "/v1/pools"),
        (Method::POST, "/v1/pools"),
        (Method::DELETE, "/v1/volumes/v0"),
        (Method::POST, "/v1/commands"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer "),
            Some(TOKEN),
            Some("Basic MDEyMzQ1Njc4OWFiY2RlZi10ZXN0LXRva2Vu"),
            Some(&*format!("Bearer {TOKEN}x")),
        ] {
            let r = api
                .raw(method.clone(), uri, br#"{"name":"p0"}"#.to_vec(), auth)
                .await;
            assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
        }
    }
    assert!(api.svc.state().pools.is_empty(), "nothing changed");
    let r = api
        .raw(
            Method::GET,
            "/v1/pools",
            vec![],
            Some(&format!("bearer {TOKEN}")),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "the scheme is case-insensitive");
    let r = api.raw(Method::GET, "/v1/openapi.json", vec![], None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with('3')));
}

#[test]
#[should_panic(expected = "must not be empty")]
fn an_empty_token_is_refused() {
    let _ = router(Arc::new(FakeService::new()), String::new());
}

#[tokio::test]
async fn mdisk_lifecycle() {
    let api = Api::new();
    let path = api.path("md0.img");
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "md0", "path": path, "create_size_bytes": 1u64 << 30}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["name"], "md0");
    assert_eq!(r.json["mode"], "unmanaged");
    assert_eq!(r.json["capacity_bytes"], 1u64 << 30);
    assert_eq!(r.json["status"], "online");
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(1 << 30)
    );

    // An existing file is probed, not created.
    let other = api.path("md1.img");
    std::fs::write(&other, vec![0u8; 4096]).expect("write");
    let r = api
        .post("/v1/mdisks", json!({"name": "md1", "path": other}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["capacity_bytes"], 4096);

    let r = api.get("/v1/mdisks").await;
    assert_eq!(r.status, StatusCode::OK);
    let names: Vec<&str> = r
        .json
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["md0", "md1"]);

    let r = api.get("/v1/mdisks/md0").await;
    assert_eq!((r.status, &r.json["path"]), (StatusCode::OK, &json!(path)));
    assert_error(
        &api.get("/v1/mdisks/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let r = api
        .post("/v1/mdisks/md1/rename", json!({"new_name": "md9"}))
        .await;
    assert_eq!((r.status, &r.json["name"]), (StatusCode::OK, &json!("md9")));
    assert_error(
        &api.post("/v1/mdisks/md9/rename", json!({"new_name": "md0"}))
            .await,
        StatusCode::CONFLICT,
        "already_exists",
    );
    assert_error(
        &api.post("/v1/mdisks/md9/rename", json!({"new_name": "bad name!"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    );

    let r = api.delete("/v1/mdisks/md9").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.json, Value::Null);
    assert_error(
        &api.delete("/v1/mdisks/md9").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert!(std::path::Path::new(&other).exists(), "data untouched");
}

#[tokio::test]
async fn mdisk_add_refusals_leave_nothing_behind() {
    let api = Api::new();
    let path = api.path("md0.img");
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "md0", "path": path, "create_size_bytes": 1u64 << 20}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let before = api.svc.state();

    // Same name with a new file: refused before the file is created.
    let fresh = api.path("fresh.img");
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "md0", "path": fresh, "create_size_bytes": 1u64 << 20}),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "already_exists");
    assert!(!std::path::Path::new(&fresh).exists());
    // Same path under another name.
    let r = api
        .post("/v1/mdisks", json!({"name": "md1", "path": path}))
        .await;
    assert_error(&r, StatusCode::CONFLICT, "in_use");
    // Creating over an existing file.
    let existing = api.path("existing.img");
    std::fs::write(&existing, b"keep").expect("write");
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "md2", "path": existing, "create_size_bytes": 1u64 << 20}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(std::fs::read(&existing).ok().as_deref(), Some(&b"keep"[..]));
    // Missing path, bad create size.
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "md3", "path": api.path("missing")}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "md4", "path": api.path("x"), "create_size_bytes": 1000}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(r.json["field"], "create_size_bytes");
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "bad/name", "path": api.path("y"), "create_size_bytes": 4096}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_name");
    assert!(!std::path::Path::new(&api.path("y")).exists());
    assert_eq!(api.svc.state(), before);
}

#[tokio::test]
async fn pools_with_capacity_accounting() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    let r = api.get("/v1/pools/p0").await;
    assert_eq!(r.status, StatusCode::OK);
    let p = &r.json;
    assert_eq!(p["extent_size_mib"], 16);
    assert_eq!(p["extents_total"], 128);
    assert_eq!(p["extents_free"], 128);
    assert_eq!(p["capacity_bytes"], 2u64 << 30);
    assert_eq!(p["free_bytes"], 2u64 << 30);
    assert_eq!(p["used_bytes"], 0);
    assert_eq!(p["mdisk_count"], 2);
    assert_eq!(p["volume_count"], 0);
    assert_eq!(p["mdisks"], json!(["md0", "md1"]));

    let r = api.get("/v1/mdisks/md1").await;
    assert_eq!(r.json["mode"], "managed");
    assert_eq!(r.json["pool"], "p0");
    assert_eq!(
        (
            r.json["extents_total"].as_u64(),
            r.json["extents_free"].as_u64()
        ),
        (Some(64), Some(64))
    );

    let r = api
        .post("/v1/pools", json!({"name": "big", "extent_size_mib": 1024}))
        .await;
    assert_eq!(
        (r.status, &r.json["extent_size_mib"]),
        (StatusCode::CREATED, &json!(1024))
    );
    assert_error(
        &api.post("/v1/pools", json!({"name": "p0"})).await,
        StatusCode::CONFLICT,
        "already_exists",
    );
    assert_error(
        &api.post("/v1/pools", json!({"name": "p1", "extent_size_mib": 0}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    let r = api.get("/v1/pools").await;
    assert_eq!(r.json.as_array().map(Vec::len), Some(2));

    assert_error(
        &api.delete("/v1/pools/p0").await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert_error(
        &api.get("/v1/pools/zz").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post("/v1/pools/zz/mdisks", json!({"mdisk": "md0"}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post("/v1/pools/big/mdisks", json!({"mdisk": "md0"}))
            .await,
        StatusCode::CONFLICT,
        "in_use",
    );
    // The pool in the URL must be the mdisk's pool.
    let r = api.delete("/v1/pools/big/mdisks/md0").await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_error(
        &api.delete("/v1/pools/p0/mdisks/zz").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let r = api.delete("/v1/pools/p0/mdisks/md1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["mdisks"], json!(["md0"]));
    assert_eq!(r.json["extents_total"], 64);

    let r = api
        .post("/v1/pools/p0/rename", json!({"new_name": "gold"}))
        .await;
    assert_eq!(
        (r.status, &r.json["name"]),
        (StatusCode::OK, &json!("gold"))
    );
    assert_eq!(api.get("/v1/mdisks/md0").await.json["pool"], "gold");

    assert_eq!(
        api.delete("/v1/pools/gold/mdisks/md0").await.status,
        StatusCode::OK
    );
    assert_eq!(
        api.delete("/v1/pools/gold").await.status,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &api.get("/v1/pools/gold").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn volumes_create_expand_rename_delete() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    let r = api
        .post(
            "/v1/volumes",
            json!({"name": "v0", "pool": "p0", "size_bytes": 100u64 << 20}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let v = &r.json;
    assert_eq!(v["layout"], "striped");
    assert_eq!(v["extent_count"], 7);
    assert_eq!(v["size_bytes"], 100u64 << 20);
    assert_eq!(v["mdisks_used"], json!(["md0", "md1"]));

    let r = api
        .post(
            "/v1/volumes",
            json!({"name": "v1", "pool": "p0", "size_bytes": 32u64 << 20, "layout": "sequential", "mdisks": ["md1"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["mdisks_used"], json!(["md1"]));
    assert_eq!(r.json["placement"], json!(["md1"]));

    let p = api.get("/v1/pools/p0").await.json;
    assert_eq!(
        (p["extents_used"].as_u64(), p["volume_count"].as_u64()),
        (Some(9), Some(2))
    );
    assert_eq!(p["used_bytes"], 9u64 << 24);

    // Insufficient capacity: 409 with the numbers, in people's units too.
    let before = api.svc.state();
    let r = api
        .post(
            "/v1/volumes",
            json!({"name": "v2", "pool": "p0", "size_bytes": 10u64 << 30}),
        )
        .await;
    assert_error(&r, StatusCode::CONFLICT, "insufficient_capacity");
    assert_eq!(r.json["free_extents"], 119);
    assert_eq!(r.json["extent_size_mib"], 16);
    assert_eq!(r.json["needed_bytes"], 10u64 << 30);
    assert_eq!(
        r.json["message"],
        "pool 'p0' has 1.86 GiB free (119 extents of 16 MiB); 10.00 GiB needed"
    );
    assert_eq!(api.svc.state(), before, "nothing changed");

    assert_error(
        &api.post(
            "/v1/volumes",
            json!({"name": "v0", "pool": "p0", "size_bytes": 512}),
        )
        .await,
        StatusCode::CONFLICT,
        "already_exists",
    );
    assert_error(
        &api.post(
            "/v1/volumes",
            json!({"name": "v3", "pool": "p0", "size_bytes": 1000}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert_error(
        &api.post(
            "/v1/volumes",
            json!({"name": "v3", "pool": "zz", "size_bytes": 512}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post(
            "/v1/volumes",
            json!({"name": "v3", "pool": "p0", "size_bytes": 512, "layout": "diagonal"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );

    let r = api
        .post("/v1/volumes/v0/expand", json!({"size_bytes": 200u64 << 20}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(
        (
            r.json["size_bytes"].as_u64(),
            r.json["extent_count"].as_u64()
        ),
        (Some(200 << 20), Some(13))
    );
    assert_error(
        &api.post("/v1/volumes/v0/expand", json!({"size_bytes": 1u64 << 20}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert_error(
        &api.post("/v1/volumes/nope/expand", json!({"size_bytes": 1u64 << 30}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let r = api
        .post("/v1/volumes/v1/rename", json!({"new_name": "db"}))
        .await;
    assert_eq!((r.status, &r.json["name"]), (StatusCode::OK, &json!("db")));
    let r = api.get("/v1/volumes").await;
    let names: Vec<&str> = r
        .json
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["db", "v0"]);
    assert_eq!(api.get("/v1/volumes/db").await.json["pool"], "p0");

    assert_error(
        &api.delete("/v1/pools/p0/mdisks/md0").await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert_eq!(
        api.delete("/v1/volumes/v0").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/v1/volumes/db").await.status,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &api.get("/v1/volumes/db").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(api.get("/v1/pools/p0").await.json["extents_free"], 128);

    let s = api.get("/v1/status").await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(
        (
            s.json["pool_count"].as_u64(),
            s.json["volume_count"].as_u64()
        ),
        (Some(1), Some(0))
    );
    assert_eq!(s.json["free_bytes"], 2u64 << 30);
}

#[tokio::test]
async fn image_mode_volumes() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    let r = api
        .post(
            "/v1/mdisks",
            json!({"name": "md3", "path": api.path("md3"), "create_size_bytes": 40u64 << 20}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // A volume literally called "image" stays reachable beside the static route.
    let r = api
        .post(
            "/v1/volumes/image",
            json!({"name": "image", "pool": "p0", "mdisk": "md3"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        (r.json["layout"].as_str(), r.json["extent_count"].as_u64()),
        (Some("image"), Some(3))
    );
    assert_eq!(r.json["size_bytes"], 40u64 << 20);
    let m = api.get("/v1/mdisks/md3").await.json;
    assert_eq!(
        (m["mode"].as_str(), m["volume"].as_str()),
        (Some("image"), Some("image"))
    );
    assert_eq!(api.get("/v1/volumes/image").await.json["name"], "image");
    assert_error(
        &api.post(
            "/v1/volumes/image",
            json!({"name": "i2", "pool": "p0", "mdisk": "md3"}),
        )
        .await,
        StatusCode::CONFLICT,
        "in_use",
    );
    assert_error(
        &api.post(
            "/v1/volumes/image/expand",
            json!({"size_bytes": 1u64 << 30}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    // Image mdisks are not pool capacity.
    assert_eq!(api.get("/v1/pools/p0").await.json["extents_total"], 128);
    assert_eq!(
        api.delete("/v1/volumes/image").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.get("/v1/mdisks/md3").await.json["mode"], "unmanaged");
}

#[tokio::test]
async fn bad_bodies_are_400_and_change_nothing() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    let before = api.svc.state();
    let auth = format!("Bearer {TOKEN}");
    let cases: &[(&str, &str, &str)] = &[
        ("/v1/pools", "{\"name\": \"p1\"", "malformed JSON"),
        ("/v1/pools", "not json", "malformed JSON"),
        ("/v1/pools", "", "empty"),
        ("/v1/pools", "[]", "invalid request"),
        (
            "/v1/pools",
            r#"{"name": "p1", "extent_size": 16}"#,
            "unknown field `extent_size`",
        ),
        ("/v1/pools", r#"{"name": 7}"#, "invalid type"),
        (
            "/v1/pools",
            r#"{"name": "p1", "extent_size_mib": 4294967296}"#,
            "field `extent_size_mib`: invalid value",
        ),
        (
            "/v1/pools",
            r#"{"name": "p1", "extent_size_mib": -1}"#,
            "invalid value",
        ),
        (
            "/v1/volumes",
            r#"{"name": "v", "pool": "p0", "size_bytes": 18446744073709551616}"#,
            "field `size_bytes` must be a whole number from 0 to 18446744073709551615",
        ),
        (
            "/v1/volumes",
            r#"{"name": "v", "pool": "p0", "size_bytes": "10GiB"}"#,
            "invalid type",
        ),
        (
            "/v1/volumes",
            r#"{"name": "v", "pool": "p0"}"#,
            "missing field `size_bytes`",
        ),
        (
            "/v1/volumes/x/expand",
            r#"{"size_bytes": 1.5}"#,
            "field `size_bytes` must be a whole number",
        ),
        (
            "/v1/mdisks",
            r#"{"name": "m", "path": "/x", "create_size_bytes": null, "extra": 1}"#,
            "unknown field",
        ),
        (
            "/v1/commands",
            r#"{"op": "create_pool", "name": "p1", "extent_size_mib": 16, "typo": 1}"#,
            "unknown field `typo`",
        ),
        ("/v1/commands", r#"{"op": "explode"}"#, "unknown variant"),
        ("/v1/commands", r#"{"name": "p1"}"#, "missing field `op`"),
    ];
    for (uri, body, expect) in cases {
        let r = api
            .raw(Method::POST, uri, body.as_bytes().to_vec(), Some(&auth))
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_json");
        let msg = r.json["message"].as_str().unwrap_or_default();
        assert!(msg.contains(expect), "{uri} {body}: {msg}");
    }
    assert_eq!(api.svc.state(), before);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let api = Api::new();
    let name = "a".repeat(crate::BODY_BYTES_MAX);
    let body = format!(r#"{{"name": "{name}"}}"#).into_bytes();
    let r = api
        .raw(
            Method::POST,
            "/v1/pools",
            body,
            Some(&format!("Bearer {TOKEN}")),
        )
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(api.svc.state().pools.is_empty());
    let body = format!(r#"{{"op": "create_pool", "extent_size_mib": 16, "name": "{name}"}}"#);
    let r = api
        .raw(
            Method::POST,
            "/v1/commands",
            body.into_bytes(),
            Some(&format!("Bearer {TOKEN}")),
        )
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // Just under the limit is read (and refused by the state machine).
    let name = "a".repeat(crate::BODY_BYTES_MAX - 20);
    let body = format!(r#"{{"name": "{name}"}}"#).into_bytes();
    let r = api
        .raw(
            Method::POST,
            "/v1/pools",
            body,
            Some(&format!("Bearer {TOKEN}")),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_name");
}

#[tokio::test]
async fn raw_commands() {
    let api = Api::new();
    let r = api
        .post(
            "/v1/commands",
            json!({"op": "create_pool", "name": "p0", "extent_size_mib": 16}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["created"]["name"], "p0");
    let r = api
        .post("/v1/commands", json!({"op": "delete_pool", "name": "p0"}))
        .await;
    assert_eq!((r.status, &r.json), (StatusCode::OK, &json!("done")));
    assert_error(
        &api.post("/v1/commands", json!({"op": "delete_pool", "name": "p0"}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // add_mdisk may not claim more than the path holds.
    let path = api.path("small");
    std::fs::write(&path, vec![0u8; 8192]).expect("write");
    let r = api
        .post(
            "/v1/commands",
            json!({"op": "add_mdisk", "name": "m", "path": path, "capacity_bytes": 1u64 << 30}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(r.json["field"], "capacity_bytes");
    let r = api
        .post(
            "/v1/commands",
            json!({"op": "add_mdisk", "name": "m", "path": path, "capacity_bytes": 4096}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(api.svc.state().mdisks["m"].capacity_bytes, 4096);
    // The optional `mdisks` of create_volume may be left out.
    let cmd = crate::parse_command(
        br#"{"op":"create_volume","name":"v","pool":"p","size_bytes":512,"layout":"striped"}"#,
    );
    assert!(cmd.is_ok());
}

#[tokio::test]
async fn status_reports_node_and_disk_paths() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    api.svc.set_offline("md1", "EIO on read at offset 0");
    let r = api.get("/v1/status").await;
    assert_eq!(r.status, StatusCode::OK);
    let s = &r.json;
    assert_eq!(s["node_id"], 1);
    assert_eq!(s["nbd_portal"], "127.0.0.1:10809");
    assert_eq!(s["iscsi_portal"], "127.0.0.1:3260");
    assert_eq!(s["iscsi_target"], "iqn.2026-11.dev.sanvirt:node1");
    assert_eq!(
        (s["mdisk_count"].as_u64(), s["capacity_bytes"].as_u64()),
        (Some(2), Some(2 << 30))
    );
    assert!(s["applied"].as_u64().is_some_and(|a| a >= 5));
    assert_eq!(
        s["mdisks"][1],
        json!({"name": "md1", "state": "offline", "reason": "EIO on read at offset 0"})
    );
    let m = api.get("/v1/mdisks/md1").await.json;
    assert_eq!(
        (m["status"].as_str(), m["status_reason"].as_str()),
        (Some("offline"), Some("EIO on read at offset 0"))
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let api = Api::new();
    assert_error(
        &api.get("/v1/nothing").await,
        StatusCode::NOT_FOUND,
        "no_route",
    );
    assert_error(&api.get("/").await, StatusCode::NOT_FOUND, "no_route");
    // Names are percent-decoded; bytes that are not UTF-8 are a JSON 400.
    assert_error(
        &api.get("/v1/pools/%FF").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert_error(
        &api.get("/v1/pools/a%20b").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.call(Method::PUT, "/v1/pools", Some(json!({}))).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

/// The router and the OpenAPI document describe the same endpoints: every
/// routed path is documented, and every method answers (not 405, not
/// `no_route`) exactly where the document says it does.
#[tokio::test]
async fn openapi_lists_every_route() {
    let api = Api::new();
    let doc: Value = serde_json::from_str(&crate::openapi_json()).expect("valid JSON");
    let paths = doc["paths"].as_object().expect("paths");
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .map(move |m| (m.to_uppercase(), p.clone()))
        })
        .collect();

    let to_openapi = |p: &str| -> String {
        p.split('/')
            .map(|seg| match seg.strip_prefix(':') {
                Some(var) => format!("{{{var}}}"),
                None => seg.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut routed_paths: BTreeSet<String> = crate::protected_routes()
        .iter()
        .map(|(p, _)| to_openapi(p))
        .collect();
    routed_paths.insert(crate::OPENAPI_PATH.to_string());
    let documented_paths: BTreeSet<String> = paths.keys().cloned().collect();
    assert_eq!(routed_paths, documented_paths);

    let mut answered = BTreeSet::new();
    for path in &routed_paths {
        let uri = path
            .replace("{name}", "x")
            .replace("{mdisk}", "y")
            .replace("{initiator}", "iqn.2001-04.com.example:z")
            .replace("{host}", "h")
            .replace("{volume}", "v");
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ] {
            let r = api.call(method.clone(), &uri, Some(json!({}))).await;
            if r.status != StatusCode::METHOD_NOT_ALLOWED && r.json["error"] != "no_route" {
                answered.insert((method.to_string(), path.clone()));
            }
        }
    }
    assert_eq!(answered, documented);
    assert_eq!(documented.len(), 46);

    // The documented limits are the configuration model's.
    let schemas = &doc["components"]["schemas"];
    let size = &schemas["CreateVolumeRequest"]["properties"]["size_bytes"];
    assert_eq!(
        size["maximum"].as_u64(),
        Some(sanvirt_config::VOLUME_BYTES_MAX)
    );
    assert_eq!(
        size["multipleOf"].as_u64(),
        Some(sanvirt_config::SECTOR_BYTES)
    );
    let ext = &schemas["CreatePoolRequest"]["properties"]["extent_size_mib"];
    assert_eq!(
        ext["minimum"].as_u64(),
        Some(u64::from(sanvirt_config::EXTENT_SIZE_MIB_MIN))
    );
    assert_eq!(
        ext["maximum"].as_u64(),
        Some(u64::from(sanvirt_config::EXTENT_SIZE_MIB_MAX))
    );
    let name = &schemas["RenameRequest"]["properties"]["new_name"];
    assert_eq!(
        name["maxLength"].as_u64(),
        Some(sanvirt_config::NAME_LEN_MAX as u64)
    );

    // Everything but the document itself requires the bearer token.
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    assert_eq!(paths["/v1/openapi.json"]["get"]["security"], json!([{}]));
}

/// `docs/openapi.json` is the document the API serves. To refresh it:
/// `SANVIRT_UPDATE_DOCS=1 cargo test -p sanvirt-admin openapi_doc_file`.
#[test]
fn openapi_doc_file_is_current() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let current = crate::openapi_json();
    if std::env::var_os("SANVIRT_UPDATE_DOCS").is_some() {
        std::fs::write(&file, &current).expect("write docs/openapi.json");
    }
    let on_disk = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        on_disk == current,
        "docs/openapi.json is stale: run SANVIRT_UPDATE_DOCS=1 cargo test -p sanvirt-admin openapi_doc_file"
    );
}

fn node_spec(name: &str) -> sanvirt_config::NodeSpec {
    sanvirt_config::NodeSpec {
        name: name.into(),
        cluster_addr: format!("{name}.example.com:7100"),
        admin_addr: format!("{name}.example.com:7480"),
        nbd_portal: None,
        iscsi_portal: None,
        cache_line: None,
        witness: false,
    }
}

#[test]
fn command_schema_mirror_serializes_like_the_command() {
    use sanvirt_config::{Command, VolumeLayout};
    let s = |x: &str| x.to_string();
    let commands = vec![
        Command::AddMdisk {
            name: s("m"),
            path: s("/d"),
            capacity_bytes: 4096,
        },
        Command::RemoveMdisk { name: s("m") },
        Command::RenameMdisk {
            name: s("m"),
            new_name: s("n"),
        },
        Command::CreatePool {
            name: s("p"),
            extent_size_mib: 16,
        },
        Command::DeletePool { name: s("p") },
        Command::RenamePool {
            name: s("p"),
            new_name: s("q"),
        },
        Command::AddMdiskToPool {
            mdisk: s("m"),
            pool: s("p"),
        },
        Command::RemoveMdiskFromPool { mdisk: s("m") },
        Command::CreateVolume {
            name: s("v"),
            pool: s("p"),
            size_bytes: 512,
            layout: VolumeLayout::Sequential,
            mdisks: vec![s("m")],
            thin: None,
            io_group: None,
        },
        Command::CreateImageVolume {
            name: s("v"),
            pool: s("p"),
            mdisk: s("m"),
            io_group: None,
        },
        Command::ExpandVolume {
            name: s("v"),
            new_size_bytes: 1024,
        },
        Command::DeleteVolume { name: s("v") },
        Command::RenameVolume {
            name: s("v"),
            new_name: s("w"),
        },
        Command::CreateHost {
            name: s("h"),
            initiators: vec![],
        },
        Command::AddHostInitiator {
            host: s("h"),
            initiator: s("iqn.2001-04.com.example:a"),
        },
        Command::RemoveHostInitiator {
            host: s("h"),
            initiator: s("iqn.2001-04.com.example:a"),
        },
        Command::DeleteHost { name: s("h") },
        Command::RenameHost {
            name: s("h"),
            new_name: s("g"),
        },
        Command::SetHostChap {
            host: s("h"),
            chap: None,
        },
        Command::MapVolume {
            volume: s("v"),
            host: s("h"),
            lun: None,
        },
        Command::UnmapVolume {
            volume: s("v"),
            host: s("h"),
        },
        Command::SetIscsiPortal { portal: None },
        Command::SetReservations {
            volume_id: 1,
            state: Default::default(),
            expected_generation: None,
        },
        Command::CreateCluster {
            name: s("c"),
            uid: s("u"),
            node: node_spec("n1"),
            import: None,
        },
        Command::AddNode {
            node: node_spec("n2"),
        },
        Command::RemoveNode { name: s("n2") },
        Command::SetNodeOnline {
            node: 2,
            online: true,
        },
        Command::SetPreferredNode {
            volume: s("v"),
            node: s("n1"),
        },
        Command::SetVolumeCacheMode {
            volume: s("v"),
            mode: sanvirt_config::VolumeCacheMode::WriteThrough,
        },
        Command::CachePairBroken {
            io_group: 0,
            epoch: 1,
            node: 1,
        },
        Command::CachePairJoined {
            io_group: 0,
            epoch: 1,
            node: 1,
        },
    ];
    let doc: Value = serde_json::from_str(&crate::openapi_json()).expect("valid JSON");
    let variants = doc["components"]["schemas"]["Command"]["oneOf"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(variants, commands.len(), "one schema per command");
    // The schema is derived from the real types: each command's `op` tag
    // appears in it.
    let text = doc["components"]["schemas"]["Command"].to_string();
    for c in commands {
        let op = serde_json::to_value(&c).expect("serialize")["op"].clone();
        assert!(text.contains(&op.to_string()), "{op} in the Command schema");
    }
}

/// `serve` over a real socket: answers, then stops on the shutdown signal.
#[tokio::test]
async fn serve_answers_and_shuts_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(Arc::new(FakeService::new()), TOKEN.into());
    let server = tokio::spawn(crate::serve(listener, app, async {
        let _ = stopped.await;
    }));
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.expect("read");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"node_id\":1"), "{resp}");
    let _ = stop.send(());
    let done = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
}

impl Api {
    async fn put(&self, uri: &str, body: Value) -> Reply {
        self.call(Method::PUT, uri, Some(body)).await
    }

    /// Pool p0 with volumes `names` of 64 MiB.
    async fn volumes(&self, names: &[&str]) {
        self.pool_with_two_mdisks().await;
        for v in names {
            let r = self
                .post(
                    "/v1/volumes",
                    json!({"name": v, "pool": "p0", "size_bytes": 64u64 << 20}),
                )
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
        }
    }
}

const IQN1: &str = "iqn.1994-05.com.redhat:client1";
const IQN2: &str = "iqn.1994-05.com.redhat:client2";

#[tokio::test]
async fn hosts_and_initiators() {
    let api = Api::new();
    let r = api
        .post("/v1/hosts", json!({"name": "h1", "initiators": [IQN1]}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["initiators"], json!([IQN1]));
    assert_eq!(r.json["chap"], "none");
    assert_eq!(r.json["luns"], json!([]));
    // An initiator belongs to one host.
    let r = api
        .post("/v1/hosts", json!({"name": "h2", "initiators": [IQN1]}))
        .await;
    assert_error(&r, StatusCode::CONFLICT, "in_use");
    assert_eq!(
        r.json["message"],
        format!("initiator '{IQN1}' is in use: it belongs to host 'h1'")
    );
    let r = api
        .post(
            "/v1/hosts",
            json!({"name": "h2", "initiators": ["IQN.1994-05.com.redhat:x"]}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    let r = api
        .post("/v1/hosts", json!({"name": "h2", "initiator": IQN2}))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_json");
    let r = api.post("/v1/hosts", json!({"name": "h2"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let r = api
        .post("/v1/hosts/h2/initiators", json!({"initiator": IQN2}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["initiators"], json!([IQN2]));
    let r = api.delete(&format!("/v1/hosts/h2/initiators/{IQN1}")).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    let r = api.delete(&format!("/v1/hosts/h2/initiators/{IQN2}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["initiators"], json!([]));
    let r = api
        .post("/v1/hosts/h2/rename", json!({"new_name": "h3"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["name"], "h3");
    let r = api.get("/v1/hosts").await;
    let names: Vec<&str> = r
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["h1", "h3"]);
    assert_eq!(
        api.delete("/v1/hosts/h3").await.status,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &api.get("/v1/hosts/h3").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(api.get("/v1/status").await.json["host_count"], 1);
}

#[tokio::test]
async fn mappings() {
    let api = Api::new();
    api.volumes(&["v0", "v1"]).await;
    for (h, i) in [("h1", IQN1), ("h2", IQN2)] {
        let r = api
            .post("/v1/hosts", json!({"name": h, "initiators": [i]}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    }
    let r = api
        .post("/v1/mappings", json!({"volume": "v0", "host": "h1"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["lun"], 0);
    assert_eq!(r.json["host"], "h1");
    let r = api
        .post(
            "/v1/mappings",
            json!({"volume": "v1", "host": "h1", "lun": 7}),
        )
        .await;
    assert_eq!(r.json["lun"], 7, "{}", r.json);
    let r = api
        .post(
            "/v1/mappings",
            json!({"volume": "v0", "host": "h2", "lun": 3}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let r = api
        .post("/v1/mappings", json!({"volume": "v0", "host": "h1"}))
        .await;
    assert_error(&r, StatusCode::CONFLICT, "in_use");
    let r = api
        .post(
            "/v1/mappings",
            json!({"volume": "v1", "host": "h2", "lun": 16384}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    let r = api
        .post("/v1/mappings", json!({"volume": "nope", "host": "h2"}))
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");

    let r = api.get("/v1/mappings").await;
    let rows: Vec<(String, u64, String)> = r
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["host"].as_str().unwrap().to_string(),
                m["lun"].as_u64().unwrap(),
                m["volume"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let own = |h: &str, l: u64, v: &str| (h.to_string(), l, v.to_string());
    assert_eq!(
        rows,
        [own("h1", 0, "v0"), own("h1", 7, "v1"), own("h2", 3, "v0")]
    );
    // The volume and host views show them.
    let r = api.get("/v1/volumes/v0").await;
    assert_eq!(
        r.json["mappings"],
        json!([{"host": "h1", "lun": 0}, {"host": "h2", "lun": 3}])
    );
    let r = api.get("/v1/hosts/h1").await;
    assert_eq!(r.json["luns"][1]["volume"], "v1");
    assert_eq!(r.json["luns"][1]["lun"], 7);
    // Deleting what is mapped is refused, naming the other side.
    let r = api.delete("/v1/volumes/v0").await;
    assert_error(&r, StatusCode::CONFLICT, "in_use");
    assert!(
        r.json["message"].as_str().unwrap().contains("'h1', 'h2'"),
        "{}",
        r.json
    );
    let r = api.delete("/v1/hosts/h1").await;
    assert_error(&r, StatusCode::CONFLICT, "in_use");
    assert_eq!(
        api.delete("/v1/mappings/h1/v0").await.status,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &api.delete("/v1/mappings/h1/v0").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(
        api.delete("/v1/mappings/h2/v0").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.delete("/v1/volumes/v0").await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn chap_secrets_are_never_returned() {
    let api = Api::new();
    api.volumes(&["v0"]).await;
    api.post("/v1/hosts", json!({"name": "h1", "initiators": [IQN1]}))
        .await;
    let (secret, mutual) = ("s3cret-one-way", "s3cret-mutual!");
    let r = api
        .put(
            "/v1/hosts/h1/chap",
            json!({"username": "u", "secret": "short"}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert!(!r.json.to_string().contains("short"), "{}", r.json);
    let r = api
        .put(
            "/v1/hosts/h1/chap",
            json!({"username": "u", "secret": secret, "mutual": {"username": "t", "secret": mutual}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["chap"], "mutual");
    assert_eq!(r.json["chap_username"], "u");
    // The secret is stored...
    let stored = api.svc.state().hosts["h1"].chap.clone().unwrap();
    assert_eq!(stored.secret.expose(), secret);
    // ...and appears in no response.
    api.post("/v1/mappings", json!({"volume": "v0", "host": "h1"}))
        .await;
    for uri in [
        "/v1/hosts",
        "/v1/hosts/h1",
        "/v1/mappings",
        "/v1/volumes",
        "/v1/status",
    ] {
        let text = api.get(uri).await.json.to_string();
        assert!(
            !text.contains(secret) && !text.contains(mutual),
            "{uri}: {text}"
        );
    }
    let r = api
        .put(
            "/v1/hosts/h1/chap",
            json!({"username": "u", "secret": secret}),
        )
        .await;
    assert_eq!(r.json["chap"], "one_way");
    assert_eq!(r.json["chap_mutual_username"], Value::Null);
    let r = api.delete("/v1/hosts/h1/chap").await;
    assert_eq!(r.json["chap"], "none");
    assert_eq!(r.json["chap_username"], Value::Null);
    let r = api
        .put(
            "/v1/hosts/nope/chap",
            json!({"username": "u", "secret": secret}),
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn iscsi_portal() {
    let api = Api::new();
    let r = api.get("/v1/iscsi/portal").await;
    assert_eq!(
        r.json,
        json!({"configured": false, "listen": null, "enabled": null})
    );
    let r = api
        .put("/v1/iscsi/portal", json!({"listen": "0.0.0.0:3260"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(
        r.json,
        json!({"configured": true, "listen": "0.0.0.0:3260", "enabled": true})
    );
    let r = api
        .put(
            "/v1/iscsi/portal",
            json!({"listen": "[::]:3261", "enabled": false}),
        )
        .await;
    assert_eq!(r.json["enabled"], false);
    let r = api
        .put("/v1/iscsi/portal", json!({"listen": "example.com:3260"}))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(
        api.get("/v1/iscsi/portal").await.json["listen"],
        "[::]:3261"
    );
    let r = api.delete("/v1/iscsi/portal").await;
    assert_eq!(r.json["configured"], false);
}

#[tokio::test]
async fn thin_volumes() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    let r = api
        .post(
            "/v1/volumes",
            json!({"name": "t", "pool": "p0", "size_bytes": 100u64 << 30,
                   "thin": {"real_size_bytes": 40u64 << 20}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["size_bytes"], 100u64 << 30);
    assert_eq!(r.json["extent_count"], 3);
    assert_eq!(
        r.json["thin"],
        json!({"real_size_bytes": 48u64 << 20, "grain_kib": 64})
    );
    assert_eq!(
        api.get("/v1/pools/p0").await.json["used_bytes"],
        48u64 << 20
    );
    let r = api
        .post("/v1/volumes/t/expand", json!({"size_bytes": 200u64 << 30}))
        .await;
    assert_eq!(r.json["extent_count"], 3, "{}", r.json);
    let r = api
        .post(
            "/v1/volumes",
            json!({"name": "u", "pool": "p0", "size_bytes": 1u64 << 30,
                   "thin": {"real_size_bytes": 1u64 << 20, "grain_kib": 48}}),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(r.json["field"], "thin.grain_kib");
    // A thick volume has no thin part.
    let r = api
        .post(
            "/v1/volumes",
            json!({"name": "k", "pool": "p0", "size_bytes": 1u64 << 20}),
        )
        .await;
    assert_eq!(r.json["thin"], Value::Null);
}

// ---- cluster ----------------------------------------------------------------

#[tokio::test]
async fn cluster_create_status_and_nodes() {
    let api = Api::new();
    let r = api.get("/v1/cluster").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json,
        json!({
            "name": null, "uid": null, "node_id": null, "leader_id": null, "term": 0,
            "quorum": true, "committed_index": 0, "applied_index": 0, "members": [],
            "cache_pairs": []
        })
    );
    let before = api.svc.state();
    assert_error(
        &api.get("/v1/nodes").await,
        StatusCode::CONFLICT,
        "not_in_cluster",
    );
    let r = api
        .post("/v1/nodes", json!({"address": "10.0.0.2:7100"}))
        .await;
    assert_error(&r, StatusCode::CONFLICT, "not_in_cluster");
    assert!(r.json["message"]
        .as_str()
        .is_some_and(|m| m.contains("sanvirt cluster create")));
    assert_error(
        &api.delete("/v1/nodes/node2").await,
        StatusCode::CONFLICT,
        "not_in_cluster",
    );
    assert_error(
        &api.post("/v1/cluster", json!({"name": "-x"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_name",
    );
    assert_error(
        &api.post("/v1/cluster", json!({"name": "c", "size": 3}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_eq!(api.svc.state(), before, "refusals change nothing");

    let r = api.post("/v1/cluster", json!({"name": "prod"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["name"], "prod");
    assert_eq!(
        (r.json["node_id"].as_u64(), r.json["leader_id"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(r.json["quorum"], true);
    assert_eq!(
        r.json["members"],
        json!([{
            "id": 1, "name": "node1", "role": "leader", "online": true,
            "lease_remaining_ms": crate::fake::FAKE_LEASE_REMAINING_MS, "io_group": 0,
            "cluster_addr": crate::fake::FAKE_CLUSTER_ADDR, "admin_addr": "127.0.0.1:7480"
        }])
    );
    let r = api.post("/v1/cluster", json!({"name": "again"})).await;
    assert_error(&r, StatusCode::CONFLICT, "already_exists");
    assert_eq!(r.json["message"], "cluster 'prod' already exists");

    let r = api
        .post("/v1/nodes", json!({"address": "10.0.0.2:7100"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        r.json,
        json!({
            "id": 2, "name": "node2", "role": "follower", "online": false,
            "lease_remaining_ms": null, "io_group": 0,
            "cluster_addr": "10.0.0.2:7100", "admin_addr": "10.0.0.2:7480"
        })
    );
    let before = api.svc.state();
    let r = api.post("/v1/nodes", json!({"address": "10.0.0.3"})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(r.json["field"], "address");
    let r = api
        .post("/v1/nodes", json!({"address": "10.0.0.2:7100"}))
        .await;
    assert_error(&r, StatusCode::CONFLICT, "in_use");
    assert_eq!(
        r.json["message"],
        "cluster_addr '10.0.0.2:7100' is in use: node 'node2' has it"
    );
    assert_eq!(api.svc.state(), before);

    let r = api.get("/v1/nodes").await;
    assert_eq!(r.status, StatusCode::OK);
    let names: Vec<&str> = r
        .json
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["node1", "node2"]);
    let r = api.get("/v1/cluster").await;
    assert_eq!(r.json["members"].as_array().map(Vec::len), Some(2));
    assert_eq!(r.json["applied_index"], r.json["committed_index"]);

    assert_error(
        &api.delete("/v1/nodes/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let r = api.delete("/v1/nodes/node2").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.json);
    let r = api.delete("/v1/nodes/node1").await;
    assert_error(&r, StatusCode::CONFLICT, "in_use");
    assert!(r.json["message"]
        .as_str()
        .is_some_and(|m| m.contains("last node that serves I/O")));
    assert_eq!(api.svc.state().nodes.len(), 1);
}

#[tokio::test]
async fn a_volume_has_a_cache_mode() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    let r = api
        .post(
            "/v1/volumes",
            json!({"name": "v", "pool": "p0", "size_bytes": 16u64 << 20}),
        )
        .await;
    assert_eq!(r.json["cache_mode"], "write_back", "{}", r.json);
    let r = api
        .post("/v1/volumes/v/cache-mode", json!({"mode": "write_through"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["cache_mode"], "write_through");
    assert_eq!(
        api.svc.state().volumes["v"].cache_mode,
        sanvirt_config::VolumeCacheMode::WriteThrough
    );
    let r = api
        .post("/v1/volumes/v/cache-mode", json!({"mode": "fast"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.json);
    assert_error(
        &api.post("/v1/volumes/nope/cache-mode", json!({"mode": "none"}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn volumes_have_an_io_group_and_a_preferred_node() {
    let api = Api::new();
    api.pool_with_two_mdisks().await;
    let create = |name: &str, io_group: Option<u32>| {
        let mut body = json!({"name": name, "pool": "p0", "size_bytes": 16u64 << 20});
        if let Some(g) = io_group {
            body["io_group"] = json!(g);
        }
        body
    };
    // Standalone: group 0, no preferred node; other groups do not exist.
    let r = api.post("/v1/volumes", create("solo", None)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        (
            &r.json["io_group"],
            &r.json["preferred_node"],
            &r.json["preferred_node_id"]
        ),
        (&json!(0), &Value::Null, &Value::Null)
    );
    let r = api.post("/v1/volumes", create("v", Some(1))).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert_eq!(r.json["field"], "io_group");
    assert_error(
        &api.post("/v1/volumes/solo/preferred-node", json!({"node": "node1"}))
            .await,
        StatusCode::CONFLICT,
        "not_in_cluster",
    );

    api.post("/v1/cluster", json!({"name": "c"})).await;
    assert_eq!(
        api.get("/v1/volumes/solo").await.json["preferred_node"],
        "node1"
    );
    for i in 2..=4 {
        let r = api
            .post("/v1/nodes", json!({"address": format!("10.0.0.{i}:7100")}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
        api.svc
            .submit(sanvirt_config::Command::SetNodeOnline {
                node: i,
                online: true,
            })
            .expect("node event");
    }
    let r = api.post("/v1/volumes", create("g1", Some(1))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(
        (
            &r.json["io_group"],
            &r.json["preferred_node"],
            &r.json["preferred_node_id"]
        ),
        (&json!(1), &json!("node3"), &json!(3))
    );
    // Without a group: the one with the fewest volumes (a tie: the lowest).
    let r = api.post("/v1/volumes", create("auto", None)).await;
    assert_eq!(
        (
            r.json["io_group"].as_u64(),
            r.json["preferred_node"].as_str()
        ),
        (Some(0), Some("node2"))
    );

    let r = api
        .post("/v1/volumes/g1/preferred-node", json!({"node": "node4"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["preferred_node"], "node4");
    let before = api.svc.state();
    let r = api
        .post("/v1/volumes/g1/preferred-node", json!({"node": "node1"}))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
    assert!(r.json["message"]
        .as_str()
        .is_some_and(|m| m.contains("choose a node of io_grp1: 'node3', 'node4'")));
    assert_error(
        &api.post("/v1/volumes/nope/preferred-node", json!({"node": "node1"}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post("/v1/volumes/g1/preferred-node", json!({"nodes": "node1"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &api.post("/v1/volumes", create("g9", Some(3))).await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
    );
    assert_eq!(api.svc.state(), before);
    let list = api.get("/v1/volumes").await.json;
    let groups: Vec<(String, u64)> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("").to_string(),
                v["io_group"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [("auto".into(), 0), ("g1".into(), 1), ("solo".into(), 0)]
    );

    // Image-mode volumes take a group too.
    let md = api.path("img");
    std::fs::write(&md, vec![0u8; 1 << 20]).expect("write");
    let r = api
        .post("/v1/mdisks", json!({"name": "img", "path": md}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    let r = api
        .post(
            "/v1/volumes/image",
            json!({"name": "iv", "pool": "p0", "mdisk": "img", "io_group": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.json["io_group"], 1);
}

#[tokio::test]
async fn membership_commands_are_not_raw_commands() {
    let api = Api::new();
    let spec =
        json!({"name": "n1", "cluster_addr": "10.0.0.1:7100", "admin_addr": "10.0.0.1:7480"});
    for (cmd, instead) in [
        (
            json!({"op": "create_cluster", "name": "c", "uid": "u", "node": spec}),
            "POST /v1/cluster",
        ),
        (json!({"op": "add_node", "node": spec}), "POST /v1/nodes"),
        (
            json!({"op": "remove_node", "name": "n1"}),
            "DELETE /v1/nodes/{name}",
        ),
        (
            json!({"op": "set_node_online", "node": 1, "online": false}),
            "leader sends node events",
        ),
    ] {
        let r = api.post("/v1/commands", cmd.clone()).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_argument");
        assert!(
            r.json["message"]
                .as_str()
                .is_some_and(|m| m.contains(instead)),
            "{cmd}: {}",
            r.json
        );
    }
    assert_eq!(api.svc.state(), sanvirt_config::State::default());
    // Choosing a preferred node is an ordinary command.
    api.pool_with_two_mdisks().await;
    api.post(
        "/v1/volumes",
        json!({"name": "v", "pool": "p0", "size_bytes": 512}),
    )
    .await;
    api.post("/v1/cluster", json!({"name": "c"})).await;
    let r = api
        .post(
            "/v1/commands",
            json!({"op": "set_preferred_node", "volume": "v", "node": "node1"}),
        )
        .await;
    assert_eq!((r.status, &r.json), (StatusCode::OK, &json!("done")));
}

/// A node without the cluster layer: only the required methods, so the
/// cluster endpoints get the trait's defaults. `refusal` makes every
/// submit fail with it (a cluster without quorum, say).
struct Standalone {
    inner: FakeService,
    refusal: Option<sanvirt_config::ConfigError>,
}

impl AdminService for Standalone {
    fn submit(
        &self,
        cmd: sanvirt_config::Command,
    ) -> Result<sanvirt_config::Outcome, sanvirt_config::ConfigError> {
        match &self.refusal {
            Some(e) => Err(e.clone()),
            None => self.inner.submit(cmd),
        }
    }

    fn state(&self) -> sanvirt_config::State {
        self.inner.state()
    }

    fn probe_mdisk(
        &self,
        path: &str,
        create_size_bytes: Option<u64>,
    ) -> Result<u64, sanvirt_config::ConfigError> {
        self.inner.probe_mdisk(path, create_size_bytes)
    }

    fn status(&self) -> crate::NodeStatus {
        self.inner.status()
    }
}

fn standalone_api(refusal: Option<sanvirt_config::ConfigError>) -> Router {
    router(
        Arc::new(Standalone {
            inner: FakeService::new(),
            refusal,
        }),
        TOKEN.into(),
    )
}

#[tokio::test]
async fn without_the_cluster_layer_the_defaults_answer() {
    let api = Api {
        router: standalone_api(None),
        svc: Arc::new(FakeService::new()),
        dir: tempfile::tempdir().expect("temp dir"),
    };
    let r = api.post("/v1/cluster", json!({"name": "c"})).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable");
    assert!(r.json["message"]
        .as_str()
        .is_some_and(|m| m.contains("does not run the cluster layer")));
    let r = api.get("/v1/cluster").await;
    assert_eq!(
        (r.status, &r.json["name"], &r.json["quorum"]),
        (StatusCode::OK, &Value::Null, &json!(true))
    );
    assert_error(
        &api.post("/v1/nodes", json!({"address": "10.0.0.2:7100"}))
            .await,
        StatusCode::CONFLICT,
        "not_in_cluster",
    );
    assert_error(
        &api.delete("/v1/nodes/n").await,
        StatusCode::CONFLICT,
        "not_in_cluster",
    );
}

#[tokio::test]
async fn cluster_refusals_are_503() {
    for (e, kind) in [
        (
            sanvirt_config::ConfigError::NoQuorum {
                reason: "1 of 3 voters reachable".into(),
            },
            "no_quorum",
        ),
        (
            sanvirt_config::ConfigError::ClusterUnavailable {
                reason: "no leader yet".into(),
            },
            "cluster_unavailable",
        ),
    ] {
        let api = Api {
            router: standalone_api(Some(e.clone())),
            svc: Arc::new(FakeService::new()),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let r = api.post("/v1/pools", json!({"name": "p0"})).await;
        assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, kind);
        assert_eq!(r.json["message"], e.to_string());
        assert!(r.json["reason"].is_string());
    }
}
