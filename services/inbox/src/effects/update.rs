//! `Update` of a remote actor by itself: its inboxes and its key (of its
//! own origin, naming it as owner) refreshed.
use serde_json::Value;
use stampede_core::targets::inbox_host;
use stampede_federation::remote_actors::remote_actor;

use super::Context;
use crate::{Inbox, InboxError};

pub(super) async fn apply(inbox: &Inbox, cx: &Context<'_>) -> Result<(), InboxError> {
    let (json, info) = (cx.json, cx.info);
    let store = &inbox.p.backends.store;
    let Some(object) = json
        .get("object")
        .filter(|o| o.get("id").and_then(Value::as_str) == Some(info.actor.as_str()))
    else {
        return Ok(());
    };
    if let Some(remote) = remote_actor(
        &inbox.p.cfg,
        &inbox.p.policy.snapshot(),
        &info.actor,
        object,
    ) {
        inbox.resolver.remember(&remote).await?;
        let host = inbox_host(&remote.inbox).unwrap_or_default();
        store
            .update_follower_inboxes(
                &info.actor,
                &remote.inbox,
                remote.shared_inbox.as_deref(),
                &host,
            )
            .await?;
        // `remote_actor` keeps only a key of the actor's origin
        // that names the actor as its owner.
        if let (Some(kid), Some(pem)) = (&remote.key_id, &remote.public_key_pem) {
            inbox.verifier.keys().update(kid, &info.actor, pem).await?;
        }
    }
    Ok(())
}
