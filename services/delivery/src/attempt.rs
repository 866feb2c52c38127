//! One attempt: the job's inbox checked by the SSRF guard, the activity
//! signed on the signing pool in the host's signature style (draft-cavage
//! `rsa-sha256` over `(request-target) host date digest`, or RFC 9421
//! `rsa-v1_5-sha256` over `@method @target-uri content-digest`), then
//! POSTed over the pooled client. With `STAMPEDE_SIGNATURE_STYLE=auto`, a
//! 400 or 401 is answered by one more POST at once in the other style (the
//! same attempt), and the style that worked is remembered for the host.
use super::*;

use stampede_core::rfc9421::{self, Profile, Target};
use stampede_runtime::signature_styles::{refused_signature, Style};

fn http_date(t: std::time::SystemTime) -> HeaderValue {
    HeaderValue::try_from(httpdate::fmt_http_date(t)).unwrap_or(HeaderValue::from_static(""))
}

const ACTIVITY_JSON: HeaderValue = HeaderValue::from_static("application/activity+json");
const ACTIVITY_JSON_STR: &str = "application/activity+json";
const DIGEST: HeaderName = HeaderName::from_static("digest");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");
const SIGNATURE: HeaderName = HeaderName::from_static("signature");
const SIGNATURE_INPUT: HeaderName = HeaderName::from_static("signature-input");

type Reply = stampede_runtime::http_client::Response;

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

    /// Signs and POSTs: once, or (auto, refused with 400 or 401) twice.
    pub(crate) async fn attempt(
        &self,
        job: &DeliveryJob,
        host: &str,
    ) -> Result<Reply, DeliveryError> {
        let url = Url::parse(&job.inbox)
            .map_err(|e| DeliveryError::Permanent(format!("bad inbox url: {e}")))?;
        self.p.http.check_url(&url)?;
        let prep = self.prepared(&job.activity_key).await?;
        let span = tracing::Span::current();
        span.record("activity_id", prep.ap_id.as_str());
        span.record("activity_type", prep.kind.as_str());
        tracing::debug!(activity_id = %prep.ap_id, "posting");
        let styles = &self.p.styles;
        let choice = styles.choose(host).await;
        let extra = extra_signed_headers(job);
        let first = self
            .post(
                &url,
                host,
                &prep,
                &extra,
                choice.style,
                choice.accept_signature,
            )
            .await?;
        if !(choice.may_switch && refused_signature(first.status)) {
            return Ok(first);
        }
        // The host may take only the other style: knock once more, now.
        let other = choice.style.other();
        let accept = other.accept_from(first.accept_signature.as_deref());
        tracing::debug!(inbox_host = %host, status = first.status, style = other.as_str(), "refused; trying the other signature style");
        let second = self
            .post(&url, host, &prep, &extra, other, accept.clone())
            .await?;
        if (200..300).contains(&second.status) {
            styles.learned(host, other, accept.as_deref()).await;
        }
        Ok(second)
    }

    /// Signs the activity in `style`, `extra` headers included and
    /// covered, and POSTs it once.
    async fn post(
        &self,
        url: &Url,
        host: &str,
        prep: &Arc<Prepared>,
        extra: &[(&'static str, HeaderValue)],
        style: Style,
        accept_signature: Option<Arc<str>>,
    ) -> Result<Reply, DeliveryError> {
        let date = self.date_now();
        let req = self
            .p
            .http
            .client()
            .post(url.clone())
            .header(CONTENT_TYPE, ACTIVITY_JSON)
            .header(ACCEPT, ACTIVITY_JSON)
            .header(DATE, date.clone());
        let req = match style {
            Style::Cavage => {
                let (prep2, host, extra2) = (prep.clone(), host.to_string(), extra.to_vec());
                let path = url[url::Position::BeforePath..url::Position::AfterQuery].to_string();
                let signature =
                    self.p
                        .signer
                        .run(move || {
                            let covered: Vec<&str>;
                            let headers = if extra2.is_empty() {
                                POST_HEADERS
                            } else {
                                covered = POST_HEADERS
                                    .iter()
                                    .copied()
                                    .chain(extra2.iter().map(|(name, _)| *name))
                                    .collect();
                                &covered[..]
                            };
                            sign_request(&prep2.key, &prep2.key_id, "POST", &path, headers, |h| {
                                match h {
                                    "host" => Some(host.as_str()),
                                    "date" => date.to_str().ok(),
                                    "digest" => Some(prep2.digest.as_str()),
                                    other => extra_value(&extra2, other),
                                }
                            })
                        })
                        .await?
                        .map_err(stampede_runtime::Error::from)?;
                req.header(DIGEST, prep.digest_value.clone())
                    .header(SIGNATURE, signature)
            }
            Style::Rfc9421 => {
                let (prep2, url2, extra2) = (prep.clone(), url.clone(), extra.to_vec());
                let created = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let signed = self
                    .p
                    .signer
                    .run(move || {
                        let asked = accept_signature
                            .as_deref()
                            .and_then(|a| Profile::from_accept_signature(a, true));
                        let mut profile = match asked {
                            Some(p) => std::borrow::Cow::Owned(p),
                            None => std::borrow::Cow::Borrowed(Profile::standard_ref(true)),
                        };
                        for (name, _) in &extra2 {
                            if !profile.components.iter().any(|c| c == name) {
                                profile.to_mut().components.push((*name).to_string());
                            }
                        }
                        let target = Target {
                            method: "POST",
                            scheme: url2.scheme(),
                            authority: &url2[url::Position::BeforeHost..url::Position::AfterPort],
                            path_and_query: &url2
                                [url::Position::BeforePath..url::Position::AfterQuery],
                        };
                        let authority = target.authority;
                        rfc9421::sign(
                            &prep2.key,
                            &prep2.key_id,
                            &profile,
                            &target,
                            |h| match h {
                                "content-digest" => Some(prep2.content_digest.as_str()),
                                "content-type" | "accept" => Some(ACTIVITY_JSON_STR),
                                "date" => date.to_str().ok(),
                                "host" => Some(authority),
                                other => extra_value(&extra2, other),
                            },
                            created,
                            None,
                        )
                    })
                    .await?
                    .map_err(stampede_runtime::Error::from)?;
                let input = HeaderValue::try_from(signed.input)
                    .map_err(|e| DeliveryError::Permanent(format!("signature-input: {e}")))?;
                let signature = HeaderValue::try_from(signed.signature)
                    .map_err(|e| DeliveryError::Permanent(format!("signature: {e}")))?;
                req.header(CONTENT_DIGEST, prep.content_digest_value.clone())
                    .header(SIGNATURE_INPUT, input)
                    .header(SIGNATURE, signature)
            }
        };
        let req = extra
            .iter()
            .fold(req, |req, (name, value)| req.header(*name, value.clone()))
            .body(prep.body.clone());
        Ok(self.p.http.send(req, url, MAX_REPLY_BYTES).await?)
    }
}

/// The value of the extra header `name`, for the signature.
fn extra_value<'a>(extra: &'a [(&'static str, HeaderValue)], name: &str) -> Option<&'a str> {
    extra
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.to_str().ok())
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
