//! Artifact list and download on the test server: Range (206/416), ETag, If-Match (412),
//! If-Range, MD5SUM, streaming from disk (spec §11, §12).

use crate::common::*;
use ddi_sim::{Assignment, HawkbitVersion, ServerOptions};
use serde_json::Value;

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn full_download_has_hawkbit_headers() {
    let e = env();
    let d = data(1000);
    let id = e.deploy(&d, &Assignment::forced());
    let href = e.download_href(id);
    let r = e.auth(e.http.get(&href)).send().unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    use sha1::Digest;
    let sha1 = hex::encode(sha1::Sha1::digest(&d));
    assert_eq!(h["content-type"], "application/octet-stream");
    assert_eq!(h["content-length"], "1000");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["etag"].to_str().unwrap(), format!("\"{sha1}\""));
    assert_eq!(h["content-disposition"], "attachment;filename=fw.bin");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h["last-modified"].to_str().unwrap().ends_with(" GMT"));
    assert_eq!(r.bytes().unwrap().as_ref(), &d[..]);
    // Full downloads are logged on the action.
    let a = e.server.action(id).unwrap();
    assert!(a.history.iter().any(|s| s
        .messages
        .iter()
        .any(|m| m.starts_with("Update Server: Target downloads "))));
}

#[test]
fn old_servers_send_a_bare_sha1_etag_and_raw_filenames() {
    let e = env_with(ServerOptions::default().version("0.9.0".parse::<HawkbitVersion>().unwrap()));
    let id = e
        .server
        .deploy(
            CID,
            "1",
            "my fw.bin",
            b"abc".to_vec(),
            &Assignment::forced(),
        )
        .unwrap();
    let href = e.download_href(id);
    assert!(href.ends_with("/my%20fw.bin"), "{href}");
    let r = e.auth(e.http.get(&href)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["etag"],
        "a9993e364706816aba3e25717850c26c9cd0d89d"
    );
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment;filename=my fw.bin"
    );
    let e = env();
    let id = e
        .server
        .deploy(
            CID,
            "1",
            "my fw.bin",
            b"abc".to_vec(),
            &Assignment::forced(),
        )
        .unwrap();
    let r = e.auth(e.http.get(e.download_href(id))).send().unwrap();
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment;filename=\"my fw.bin\""
    );
}

#[test]
fn single_range_is_206_with_content_range() {
    let e = env();
    let d = data(1000);
    let id = e.deploy(&d, &Assignment::forced());
    let href = e.download_href(id);
    for (range, start, end) in [
        ("bytes=100-199", 100, 199),
        ("bytes=900-", 900, 999),
        ("bytes=-50", 950, 999),
        ("bytes=990-5000", 990, 999),
    ] {
        let r = e
            .auth(e.http.get(&href))
            .header("Range", range)
            .send()
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes {start}-{end}/1000")
        );
        assert_eq!(
            r.headers()["content-length"].to_str().unwrap(),
            (end - start + 1).to_string()
        );
        assert_eq!(r.bytes().unwrap().as_ref(), &d[start..=end], "{range}");
    }
}

#[test]
fn multiple_ranges_are_multipart() {
    let e = env();
    let d = data(100);
    let id = e.deploy(&d, &Assignment::forced());
    let r = e
        .auth(e.http.get(e.download_href(id)))
        .header("Range", "bytes=50-52,0-1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-type"],
        "multipart/byteranges; boundary=THIS_STRING_SEPARATES_MULTIPART"
    );
    let mut expected = b"--THIS_STRING_SEPARATES_MULTIPART\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-1/100\r\n\r\n".to_vec();
    expected.extend_from_slice(&d[0..2]);
    expected.extend_from_slice(b"\r\n--THIS_STRING_SEPARATES_MULTIPART\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 50-52/100\r\n\r\n");
    expected.extend_from_slice(&d[50..53]);
    expected.extend_from_slice(b"\r\n--THIS_STRING_SEPARATES_MULTIPART--");
    assert_eq!(r.bytes().unwrap().as_ref(), &expected[..]);
}

#[test]
fn unsatisfiable_ranges_are_416() {
    let e = env();
    let id = e.deploy(&data(100), &Assignment::forced());
    let href = e.download_href(id);
    for range in [
        "bytes=100-",
        "bytes=50-10",
        "bytes=0-10,5-20",
        "bytes=abc",
        "pages=0-1",
    ] {
        let r = e
            .auth(e.http.get(&href))
            .header("Range", range)
            .send()
            .unwrap();
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(r.headers()["content-range"], "bytes */100", "{range}");
    }
}

#[test]
fn if_match_needs_the_bare_sha1() {
    let e = env();
    let id = e.deploy(b"abc", &Assignment::forced());
    let href = e.download_href(id);
    let sha1 = "a9993e364706816aba3e25717850c26c9cd0d89d";
    let status = |v: &str| {
        e.auth(e.http.get(&href))
            .header("If-Match", v)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(sha1), 200);
    assert_eq!(status("*"), 200);
    assert_eq!(status(&format!("other, {sha1}")), 200);
    assert_eq!(
        status(&format!("\"{sha1}\"")),
        412,
        "quoted ETag does not match (hawkBit quirk)"
    );
    assert_eq!(status("deadbeef"), 412);
}

#[test]
fn if_range_with_a_stale_validator_sends_everything() {
    let e = env();
    let d = data(100);
    let id = e.deploy(&d, &Assignment::forced());
    let href = e.download_href(id);
    let etag = e.auth(e.http.get(&href)).send().unwrap().headers()["etag"]
        .to_str()
        .unwrap()
        .to_string();
    let r = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=10-")
        .header("If-Range", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    let r = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=10-")
        .header("If-Range", "\"stale\"")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), 100);
    let r = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=10-")
        .header("If-Range", "Thu, 01 Jan 1970 00:00:00 GMT")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "older than Last-Modified");
}

#[test]
fn md5sum_file_and_artifact_list() {
    let e = env();
    let id = e.deploy(b"abc", &Assignment::forced());
    let href = e.download_href(id);
    let r = e.auth(e.http.get(format!("{href}.MD5SUM"))).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment;filename=fw.bin.MD5SUM"
    );
    assert_eq!(
        r.text().unwrap(),
        "900150983cd24fb0d6963f7d28e17f72  fw.bin"
    );
    let list_url = href.rsplit_once('/').unwrap().0.to_string();
    let r = e.auth(e.http.get(&list_url)).send().unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["filename"], "fw.bin");
    assert_eq!(list[0]["size"], 3);
    assert_eq!(list[0]["_links"]["download-http"]["href"], href.as_str());
}

#[test]
fn downloads_404_for_unknown_or_unassigned_artifacts_and_need_auth() {
    let e = env();
    let id = e.deploy(b"abc", &Assignment::forced());
    let href = e.download_href(id);
    assert_eq!(e.http.get(&href).send().unwrap().status(), 401);
    let base = href.rsplit_once("/softwaremodules/").unwrap().0.to_string();
    let module: u64 = href
        .split("/softwaremodules/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let missing = e
        .auth(
            e.http
                .get(format!("{base}/softwaremodules/{module}/artifacts/nope")),
        )
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.text().unwrap(),
        "",
        "hawkBit's notFound() for a file the module lacks has no body"
    );
    assert_eq!(
        e.auth(
            e.http
                .get(format!("{base}/softwaremodules/9999/artifacts/fw.bin"))
        )
        .send()
        .unwrap()
        .status(),
        404
    );
    assert_eq!(
        e.auth(e.http.get(format!("{base}/softwaremodules/9999/artifacts")))
            .send()
            .unwrap()
            .status(),
        404
    );
    // A module that is not assigned to this target.
    let m = e.server.create_module("os", "other", "1");
    e.server.upload_bytes(m, "o.bin", b"zzz".to_vec()).unwrap();
    assert_eq!(
        e.auth(
            e.http
                .get(format!("{base}/softwaremodules/{m}/artifacts/o.bin"))
        )
        .send()
        .unwrap()
        .status(),
        404
    );
    assert_eq!(
        e.auth(e.http.get(format!("{base}/softwaremodules/{m}/artifacts")))
            .send()
            .unwrap()
            .status(),
        404
    );
    // 0.9.0 does not check Range requests; 0.3.x does not check the list.
    let e = env_with(ServerOptions::default().version("0.9.0".parse::<HawkbitVersion>().unwrap()));
    let m = e.server.create_module("os", "other", "1");
    e.server.upload_bytes(m, "o.bin", b"zzz".to_vec()).unwrap();
    let url = e.url(&format!("/softwaremodules/{m}/artifacts/o.bin"));
    assert_eq!(e.auth(e.http.get(&url)).send().unwrap().status(), 404);
    assert_eq!(
        e.auth(e.http.get(&url))
            .header("Range", "bytes=0-")
            .send()
            .unwrap()
            .status(),
        206
    );
    assert_eq!(
        e.auth(
            e.http
                .get(e.url(&format!("/softwaremodules/{m}/artifacts")))
        )
        .send()
        .unwrap()
        .status(),
        200
    );
}

#[test]
fn file_backed_artifacts_stream_from_disk() {
    let e = env();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    let d = data(3 * 1024 * 1024 + 17);
    std::fs::write(&path, &d).unwrap();
    let id = e
        .server
        .deploy_file(CID, "2", "big.img", &path, &Assignment::forced())
        .unwrap();
    let href = e.download_href(id);
    let r = e.auth(e.http.get(&href)).send().unwrap();
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        d.len().to_string()
    );
    assert!(r.bytes().unwrap().as_ref() == &d[..]);
    let r = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=2000000-")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert!(r.bytes().unwrap().as_ref() == &d[2_000_000..]);
}

#[test]
fn the_download_log_records_range_status_and_length_of_every_request() {
    let e = env();
    let d = data(1000);
    let id = e.deploy(&d, &Assignment::forced());
    let href = e.download_href(id);
    assert!(e.server.download_log().is_empty());
    let full = e.auth(e.http.get(&href)).send().unwrap();
    assert_eq!(full.bytes().unwrap().len(), 1000);
    let part = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=100-199")
        .send()
        .unwrap();
    assert_eq!(part.bytes().unwrap().len(), 100);
    let refused = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=2000-")
        .send()
        .unwrap();
    assert_eq!(refused.status(), 416);
    let log = e.server.download_log();
    let seen: Vec<(Option<&str>, u16, Option<u64>)> = log
        .iter()
        .map(|r| (r.range.as_deref(), r.status, r.body_len))
        .collect();
    assert_eq!(
        seen,
        [
            (None, 200, Some(1000)),
            (Some("bytes=100-199"), 206, Some(100)),
            (Some("bytes=2000-"), 416, None),
        ]
    );
    assert!(log.iter().all(|r| r.controller_id == CID));
}
