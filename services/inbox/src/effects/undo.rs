//! `Undo` of a `Follow` (embedded or by id): the follow, or the pending
//! request, removed.
use serde_json::Value;

use super::Context;
use crate::{Inbox, InboxError};

pub(super) async fn apply(inbox: &Inbox, cx: &Context<'_>) -> Result<(), InboxError> {
    let (json, info) = (cx.json, cx.info);
    let store = &inbox.p.backends.store;
    let object = json.get("object");
    let inner_kind = object
        .and_then(Value::as_object)
        .map(stampede_core::activity::types)
        .and_then(|t| t.first().map(|s| s.to_string()));
    match inner_kind.as_deref() {
        Some("Follow") => {
            let target = object
                .and_then(|o| o.get("object"))
                .and_then(stampede_core::activity::id_of);
            if let Some(actor) = inbox.local_actor(target).await? {
                store.remove_follower(actor.id, &info.actor).await?;
                store.take_follow_request(actor.id, &info.actor).await?;
            }
        }
        None => {
            if let Some(follow_id) = info.object_id.as_deref() {
                store.remove_follow_by_id(&info.actor, follow_id).await?;
            }
        }
        Some(_) => {}
    }
    Ok(())
}
