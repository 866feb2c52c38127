//! An activity ready to send, loaded once per worker: its body, digest and
//! author's key, shared by every job of the activity (a fanout's whole
//! prefetch waits for one load instead of each loading and parsing the key).
use super::*;

/// An activity ready to send: the body, its digest and its author's key,
/// shared by every job of the activity that this worker handles.
pub(crate) struct Prepared {
    pub(crate) body: Bytes,
    pub(crate) digest: String,
    /// `digest`, ready to send (cloning it shares the bytes).
    pub(crate) digest_value: HeaderValue,
    /// The same SHA-256 as a `Content-Digest` (RFC 9530), for RFC 9421.
    pub(crate) content_digest: String,
    /// `content_digest`, ready to send.
    pub(crate) content_digest_value: HeaderValue,
    pub(crate) key_id: String,
    pub(crate) key: Arc<aws_lc_rs::rsa::KeyPair>,
    pub(crate) ap_id: String,
    /// Activity type.
    pub(crate) kind: String,
    /// Supersession: when the store was last asked (unix ms), and whether
    /// the object has been deleted.
    pub(crate) checked_ms: std::sync::atomic::AtomicI64,
    pub(crate) deleted: std::sync::atomic::AtomicBool,
    /// A `Delete` of its own author: one attempt, no retries (the key that
    /// signs it is about to go).
    pub(crate) deletes_author: bool,
    /// For a `Create` or `Update`: its author and object, to check whether a
    /// later `Delete` of the object superseded it.
    pub(crate) supersedable: Option<(i64, String)>,
}

/// Prepared activities by store key, each filled once.
pub(crate) type BodyCache = Mutex<LruCache<String, Arc<OnceCell<Arc<Prepared>>>>>;

impl Delivery {
    pub(crate) async fn prepared(&self, key: &str) -> Result<Arc<Prepared>, DeliveryError> {
        let cell = match self.bodies.lock() {
            Ok(mut c) => match c.get(key) {
                Some(cell) => cell.clone(),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    c.put(key.to_string(), cell.clone());
                    cell
                }
            },
            Err(_) => Arc::new(OnceCell::new()),
        };
        cell.get_or_try_init(|| self.load_prepared(key))
            .await
            .cloned()
    }

    /// Loads an activity's body and its author's key from the store.
    async fn load_prepared(&self, key: &str) -> Result<Arc<Prepared>, DeliveryError> {
        let store = &self.p.backends.store;
        let a = store
            .activity(key)
            .await?
            .ok_or_else(|| DeliveryError::Permanent(format!("activity {key} not found")))?;
        let actor = store
            .actor_by_id(a.actor_id)
            .await?
            .ok_or_else(|| DeliveryError::Permanent(format!("author of {key} not found")))?;
        let key_pair = load_private_key(&actor.private_key.0)
            .map_err(|e| DeliveryError::Permanent(format!("author key unusable: {e}")))?;
        let author = self.p.cfg.actor_id(&actor.name);
        let deletes_author = a.kind == "Delete"
            && a.body
                .get("object")
                .and_then(stampede_core::activity::id_of)
                == Some(author.as_str());
        let body = Bytes::from(a.delivered_body);
        let supersedable = match a.kind.as_str() {
            "Create" | "Update" => a
                .body
                .get("object")
                .and_then(stampede_core::activity::id_of)
                .map(|o| (a.actor_id, o.to_string())),
            _ => None,
        };
        let digest = digest_header(&body);
        let digest_value = HeaderValue::try_from(digest.as_str())
            .map_err(|e| DeliveryError::Permanent(format!("digest header: {e}")))?;
        let content_digest = content_digest_header(&body);
        let content_digest_value = HeaderValue::try_from(content_digest.as_str())
            .map_err(|e| DeliveryError::Permanent(format!("content-digest header: {e}")))?;
        let p = Arc::new(Prepared {
            content_digest,
            content_digest_value,
            deletes_author,
            supersedable,
            digest,
            digest_value,
            body,
            key_id: self.p.cfg.key_id(&actor.name),
            key: Arc::new(key_pair),
            ap_id: a.ap_id,
            kind: a.kind.clone(),
            checked_ms: std::sync::atomic::AtomicI64::new(0),
            deleted: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_backends::store::{NewActivity, NewActor, PrivateKey};
    use stampede_runtime::shutdown::CancellationToken;

    /// The jobs of one fanout arrive together: the first loads the activity
    /// and parses its author's key, the rest share what it loaded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_jobs_of_one_activity_share_one_load() {
        let dir = std::env::temp_dir().join(format!(
            "stampede-delivery-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let cfg = stampede_runtime::Config::from_lookup(|k| {
            (k == "STAMPEDE_DATA_DIR").then(|| dir.display().to_string())
        })
        .unwrap();
        let p = Process::connect(
            cfg,
            stampede_runtime::Role::AllInOne,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let key = stampede_core::keys::generate_rsa_2048().unwrap();
        let actor = p
            .backends
            .store
            .create_actor(NewActor {
                name: "alice".into(),
                display_name: String::new(),
                summary: String::new(),
                manually_approves_followers: false,
                private_key: PrivateKey(key.private_pkcs8_der),
                public_key_pem: key.public_pem,
            })
            .await
            .unwrap();
        let body = serde_json::json!({"id": "https://x.example/a/1", "type": "Announce"});
        p.backends
            .store
            .insert_activity(NewActivity {
                key: "k1".into(),
                ap_id: "https://x.example/a/1".into(),
                actor_id: actor.id,
                kind: "Announce".into(),
                object_id: None,
                idempotency_key: None,
                delivered_body: body.to_string().into_bytes(),
                body,
            })
            .await
            .unwrap();
        let d = Delivery::new(p.clone());
        let loads: Vec<_> = (0..32)
            .map(|_| {
                let d = d.clone();
                tokio::spawn(async move { d.prepared("k1").await })
            })
            .collect();
        let mut prepared = Vec::new();
        for l in loads {
            prepared.push(l.await.unwrap().unwrap());
        }
        assert!(prepared.iter().all(|x| Arc::ptr_eq(x, &prepared[0])));
        assert_eq!(
            prepared[0].key_id,
            format!("{}#main-key", p.cfg.actor_id("alice"))
        );
        // A missing activity is an error each time, and not remembered as found.
        assert!(matches!(
            d.prepared("missing").await,
            Err(DeliveryError::Permanent(_))
        ));
        assert!(d.prepared("missing").await.is_err());
        // The cached `Date` is an HTTP date of this second.
        let date = d.date_now();
        let t = httpdate::parse_http_date(date.to_str().unwrap()).unwrap();
        let skew = std::time::SystemTime::now().duration_since(t).unwrap();
        assert!(skew < std::time::Duration::from_secs(2), "{skew:?}");
        drop((d, p));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
