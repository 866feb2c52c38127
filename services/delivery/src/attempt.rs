//! One attempt: the job's inbox checked by the SSRF guard, the activity
//! signed on the signing pool (draft-cavage `rsa-sha256` over
//! `(request-target) host date digest`), then POSTed over the pooled client.
use super::*;

fn http_date(t: std::time::SystemTime) -> HeaderValue {
    HeaderValue::try_from(httpdate::fmt_http_date(t)).unwrap_or(HeaderValue::from_static(""))
}

const ACTIVITY_JSON: HeaderValue = HeaderValue::from_static("application/activity+json");
const DIGEST: HeaderName = HeaderName::from_static("digest");
const SIGNATURE: HeaderName = HeaderName::from_static("signature");

/// Headers a job adds to its POST beyond the signature scheme's own, each
/// sent and covered by the signature: FEP-8fcf's `Collection-Synchronization`
/// when fanout gave one (a value that is no header value is left out).
pub(crate) fn extra_signed_headers(job: &DeliveryJob) -> Vec<(&'static str, HeaderValue)> {
    let sync = job.collection_synchronization.as_str();
    if sync.is_empty() {
        return Vec::new();
    }
    match HeaderValue::from_str(sync) {
        Ok(v) => vec![(stampede_core::followers_sync::HEADER, v)],
        Err(_) => {
            tracing::warn!(inbox = %job.inbox, "collection synchronization header is not a header value; left out");
            Vec::new()
        }
    }
}

impl Delivery {
    /// The `Date` header value for now.
    pub(crate) fn date_now(&self) -> HeaderValue {
        let now = std::time::SystemTime::now();
        let secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Ok(mut cached) = self.date.lock() else {
            return http_date(now);
        };
        if cached.0 != secs {
            *cached = (secs, http_date(now));
        }
        cached.1.clone()
    }

    /// Signs and POSTs once.
    pub(crate) async fn attempt(
        &self,
        job: &DeliveryJob,
        host: &str,
    ) -> Result<stampede_runtime::http_client::Response, DeliveryError> {
        let url = Url::parse(&job.inbox)
            .map_err(|e| DeliveryError::Permanent(format!("bad inbox url: {e}")))?;
        self.p.http.check_url(&url)?;
        let prep = self.prepared(&job.activity_key).await?;
        let date = self.date_now();
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let extra = extra_signed_headers(job);
        let signature = {
            let (prep, host, date, extra) =
                (prep.clone(), host.to_string(), date.clone(), extra.clone());
            self.p
                .signer
                .run(move || {
                    let covered: Vec<&str> = POST_HEADERS
                        .iter()
                        .copied()
                        .chain(extra.iter().map(|(name, _)| *name))
                        .collect();
                    sign_request(
                        &prep.key,
                        &prep.key_id,
                        "POST",
                        &path,
                        &covered,
                        |h| match h {
                            "host" => Some(host.as_str()),
                            "date" => date.to_str().ok(),
                            "digest" => Some(prep.digest.as_str()),
                            other => extra
                                .iter()
                                .find(|(name, _)| *name == other)
                                .and_then(|(_, v)| v.to_str().ok()),
                        },
                    )
                })
                .await?
                .map_err(stampede_runtime::Error::from)?
        };
        let span = tracing::Span::current();
        span.record("activity_id", prep.ap_id.as_str());
        span.record("activity_type", prep.kind.as_str());
        tracing::debug!(activity_id = %prep.ap_id, "posting");
        let req = self
            .p
            .http
            .client()
            .post(url.clone())
            .header(CONTENT_TYPE, ACTIVITY_JSON)
            .header(ACCEPT, ACTIVITY_JSON)
            .header(DATE, date)
            .header(DIGEST, prep.digest_value.clone())
            .header(SIGNATURE, signature);
        let req = extra
            .into_iter()
            .fold(req, |req, (name, value)| req.header(name, value))
            .body(prep.body.clone());
        Ok(self.p.http.send(req, &url, MAX_REPLY_BYTES).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_collection_synchronization_is_an_extra_signed_header() {
        let mut job = DeliveryJob {
            inbox: "https://r.example/inbox".into(),
            ..DeliveryJob::default()
        };
        assert!(extra_signed_headers(&job).is_empty());
        job.collection_synchronization =
            "collectionId=\"https://s.example/users/a/followers\", url=\"https://s.example/users/a/followers_synchronization\", digest=\"00\"".into();
        let extra = extra_signed_headers(&job);
        assert_eq!(extra.len(), 1);
        assert_eq!(extra[0].0, "collection-synchronization");
        assert_eq!(extra[0].1, job.collection_synchronization.as_str());
        // Not a header value (a line break): left out, never sent half.
        job.collection_synchronization = "digest=\"00\"\r\nX-Evil: 1".into();
        assert!(extra_signed_headers(&job).is_empty());
    }
}
