use thiserror::Error;

/// Everything the protocol core can refuse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// The body is not JSON, or not a JSON object.
    #[error("malformed json: {0}")]
    MalformedJson(String),
    /// The JSON object is not an ActivityStreams activity.
    #[error("not an activity: {0}")]
    NotAnActivity(String),
    /// A field holds something the protocol does not allow.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The JSON field name.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A key could not be generated, parsed or used.
    #[error("key error: {0}")]
    Key(String),
    /// A `Signature` header could not be parsed.
    #[error("malformed signature header: {0}")]
    MalformedSignature(String),
    /// A header the signature must cover is missing from the request.
    #[error("missing header `{0}`")]
    MissingHeader(String),
    /// The signature does not verify against the key.
    #[error("signature does not verify")]
    BadSignature,
    /// The body's digest does not match the `Digest` header.
    #[error("digest mismatch")]
    DigestMismatch,
    /// The `Date` header is outside the allowed window.
    #[error("date outside the allowed window: {0}")]
    StaleDate(String),
    /// An Object Integrity Proof (FEP-8b32) that cannot be read or used:
    /// another type or cryptosuite, a bad `proofValue`, `created` ahead of
    /// the clock, a document that cannot be canonicalized.
    #[error("invalid proof: {0}")]
    InvalidProof(String),
}
