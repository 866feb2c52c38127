//! A small WebDriver client (W3C protocol, JSON over HTTP) driving Debian's
//! headless Chromium through `chromedriver`, for the console's browser
//! tests. No WebDriver crate is in the project's ecosystem notes, and the
//! few calls the tests make are a page of code over the reqwest client the
//! workspace already has.
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{free_port, wait_for};

/// The key W3C WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` process and one browser session in it; both end when
/// it is dropped.
pub struct Browser {
    driver: tokio::process::Child,
    base: String,
    http: reqwest::Client,
    /// The session was ended by [`Browser::quit`].
    ended: bool,
}

/// An element of the page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

/// The Chromium binary: the real one behind Debian's wrapper script.
fn chromium() -> &'static str {
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is not installed: scripts/test installs it (apt-get install chromium chromium-driver)")
}

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session.
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is not installed: scripts/test installs it (apt-get install chromium-driver)");
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to listen", Duration::from_secs(20), || {
            let (http, url) = (http.clone(), format!("{root}/status"));
            async move { http.get(url).send().await.is_ok() }
        })
        .await;
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1240,860",
                         "--no-first-run", "--disable-extensions"],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let mut b = Browser {
            driver,
            base: root.clone(),
            http,
            ended: false,
        };
        let v = b.call("POST", "/session", Some(caps)).await;
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session from chromedriver: {v}"));
        b.base = format!("{root}/session/{id}");
        b
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body.unwrap_or(json!({}))).unwrap()),
        };
        let r = req.send().await.unwrap();
        let status = r.status();
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert!(
            status.is_success(),
            "webdriver {method} {path}: {status} {v}"
        );
        v["value"].clone()
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// The element matching `css`, waited for up to 10 s.
    pub async fn find(&self, css: &str) -> Element<'_> {
        let start = std::time::Instant::now();
        loop {
            if let Some(e) = self.try_find(css).await {
                return e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for element {css}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element matching `css`, found again when the page
    /// replaced it between finding and clicking (a table re-rendered by
    /// its refresh).
    pub async fn click(&self, css: &str) {
        let start = std::time::Instant::now();
        loop {
            let e = self.find(css).await;
            let r = self
                .http
                .post(format!("{}/element/{}/click", self.base, e.id))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            if status.is_success() {
                return;
            }
            assert!(
                v["value"]["error"] == "stale element reference"
                    && start.elapsed() < Duration::from_secs(10),
                "click {css}: {status} {v}"
            );
        }
    }

    /// The element matching `css` now, if any.
    pub async fn try_find(&self, css: &str) -> Option<Element<'_>> {
        let url = format!("{}/element", self.base);
        let r = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&json!({ "using": "css selector", "value": css })).unwrap())
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        Some(Element {
            browser: self,
            id: v["value"][ELEMENT].as_str()?.to_string(),
        })
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Runs `script`, which calls `arguments[arguments.length - 1]` with its
    /// result when done (a `fetch`, say).
    pub async fn eval_async(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// The page's screenshot, PNG.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.call("GET", "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }

    /// The browser console's entries since the last call (level, message).
    pub async fn console_log(&self) -> Vec<(String, String)> {
        let v = self
            .call("POST", "/se/log", Some(json!({ "type": "browser" })))
            .await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["level"].as_str().unwrap_or("").to_string(),
                            e["message"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends the session (the browser with it) and the driver.
    pub async fn quit(mut self) {
        let _ = self
            .http
            .delete(&self.base)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        self.ended = true;
        let _ = self.driver.kill().await;
    }
}

impl Drop for Browser {
    /// A test that failed before `quit`: the session is ended with a plain
    /// blocking request, so no Chromium outlives the test (killing the
    /// driver alone would leave its browser running).
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        use std::io::{Read, Write};
        let Some(rest) = self.base.strip_prefix("http://") else {
            return;
        };
        let Some((authority, path)) = rest.split_once('/') else {
            return;
        };
        if let Ok(mut s) = std::net::TcpStream::connect(authority) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                s,
                "DELETE /{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            );
            let _ = s.read_to_end(&mut Vec::new());
        }
    }
}

impl Element<'_> {
    /// Types `text` into it.
    pub async fn send_keys(&self, text: &str) {
        self.browser
            .call(
                "POST",
                &format!("/element/{}/value", self.id),
                Some(json!({ "text": text })),
            )
            .await;
    }

    /// Its text as shown.
    pub async fn text(&self) -> String {
        self.browser
            .call("GET", &format!("/element/{}/text", self.id), None)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}
