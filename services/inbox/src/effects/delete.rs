//! `Delete` of a remote actor: its follows of local actors removed, its
//! cached actor document and keys forgotten (the key that signed the
//! request when it is the actor's, not a forwarder's; the proof's key).
use super::Context;
use crate::{Inbox, InboxError};

pub(super) async fn apply(inbox: &Inbox, cx: &Context<'_>) -> Result<(), InboxError> {
    let (info, key_id) = (cx.info, cx.key_id);
    let store = &inbox.p.backends.store;
    // Only a Delete of the actor itself (no object, or the actor's id).
    if info.object_id.as_deref().is_some_and(|o| o != info.actor) {
        return Ok(());
    }
    let removed = store.remove_follower_everywhere(&info.actor).await?;
    inbox.resolver.forget(&info.actor).await?;
    let keys: Vec<String> = key_id.map(str::to_string).into_iter().collect();
    inbox
        .verifier
        .keys()
        .forget_owner(&info.actor, &keys)
        .await?;
    if let Some(k) = cx.proof_key_id {
        inbox.verifier.keys().mark_assertion_key_gone(k).await;
    }
    tracing::info!(actor = %info.actor, follows_removed = removed, "remote actor deleted");
    Ok(())
}
