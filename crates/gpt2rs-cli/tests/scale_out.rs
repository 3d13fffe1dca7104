//! Scale-out: two `gpt2rs serve` processes behind nginx (docs/nginx-gpt2rs.conf) on loopback.
//! Requests through nginx reach both replicas; SIGTERM drains one (503 on /health, in-flight
//! work finished) and nginx sends the rest to the other. Skips when nginx is not installed
//! (unless GPT2RS_REQUIRE_NGINX is set, as CI does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped (so a failing test leaves nothing running).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master then stops its workers too (SIGKILL would orphan them).
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn wait_for(port: u16, path: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", path, "").map(|r| r.0) != Some(status) {
        assert!(
            Instant::now() < deadline,
            "port {port} never answered {status} on {path}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn replica(model: &Path, port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_gpt2rs"))
        .args(["serve", "--model"])
        .arg(model)
        .args(["--port", &port.to_string(), "--shutdown-grace", "20"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

fn served_ok(port: u16) -> u64 {
    let (_, text) = http(port, "GET", "/metrics", "").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("gpt2rs_requests_total{outcome=\"ok\"} "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn two_replicas_behind_nginx() {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(nginx) = nginx else {
        assert!(
            std::env::var_os("GPT2RS_REQUIRE_NGINX").is_none(),
            "GPT2RS_REQUIRE_NGINX is set but nginx is not installed"
        );
        eprintln!("SKIPPED: nginx is not installed (apt-get install nginx-light)");
        return;
    };
    let model = repo().join("tests/fixtures/models/full-vocab");
    let (a, b, lb) = (free_port(), free_port(), free_port());
    let ra = replica(&model, a);
    let _rb = replica(&model, b);
    wait_for(a, "/health", 200);
    wait_for(b, "/health", 200);

    let dir = std::env::temp_dir().join(format!("gpt2rs-nginx-{lb}"));
    std::fs::create_dir_all(&dir).unwrap();
    // nginx's workers may run as another user: let them write their temp files.
    let _ = Command::new("chmod").arg("777").arg(&dir).status();
    let conf = std::fs::read_to_string(repo().join("docs/nginx-gpt2rs.conf"))
        .unwrap()
        .replace("@DIR@", dir.to_str().unwrap())
        .replace("@LB_PORT@", &lb.to_string())
        .replace(
            "@UPSTREAMS@",
            &format!("server 127.0.0.1:{a} max_fails=1 fail_timeout=10s;\n        server 127.0.0.1:{b} max_fails=1 fail_timeout=10s;"),
        );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let _nginx = Proc(
        Command::new(nginx)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(lb, "/health", 200);

    // Concurrent requests through nginx land on both replicas.
    let body = r#"{"prompt": "Hello there", "max_tokens": 30, "temperature": 0}"#;
    let texts: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(move || {
                    let (status, text) = http(lb, "POST", "/v1/completions", body).unwrap();
                    assert_eq!(status, 200, "{text}");
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "replicas agree");
    let (na, nb) = (served_ok(a), served_ok(b));
    assert_eq!(na + nb, 8);
    assert!(na > 0 && nb > 0, "both replicas served: {na} + {nb}");

    // Streaming passes through unbuffered.
    let stream_body = r#"{"prompt": "Hello", "max_tokens": 5, "stream": true}"#;
    let (status, text) = http(lb, "POST", "/v1/completions", stream_body).unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("data: [DONE]"), "{text}");
    let nb = served_ok(b);

    // SIGTERM drains replica a: a request already running there finishes, the process
    // exits cleanly, and everything after goes to b.
    let long = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", a)).unwrap();
        let body = r#"{"prompt": "Hi", "max_tokens": 200, "stream": true}"#;
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let lines: Vec<String> = BufReader::new(s).lines().map_while(Result::ok).collect();
        lines.iter().any(|l| l == "data: [DONE]")
            && lines
                .iter()
                .any(|l| l.contains("\"finish_reason\":\"length\""))
    });
    std::thread::sleep(Duration::from_millis(200));
    let pid = ra.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        long.join().unwrap(),
        "the in-flight stream finished during the drain"
    );
    let mut ra = ra;
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(st) = ra.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "replica a did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "clean exit: {exit:?}");
    for _ in 0..4 {
        let (status, text) = http(lb, "POST", "/v1/completions", body).unwrap();
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(served_ok(b), nb + 4);
}
