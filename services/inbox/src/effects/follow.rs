//! `Follow` of a local actor: the follower's inboxes resolved, then added
//! and answered `Accept`, or kept as a request when the actor approves
//! followers by hand.
use stampede_backends::store::Follower;
use stampede_core::targets::inbox_host;
use stampede_federation::publish;

use super::Context;
use crate::{Inbox, InboxError};

pub(super) async fn apply(inbox: &Inbox, cx: &Context<'_>) -> Result<(), InboxError> {
    let (json, info) = (cx.json, cx.info);
    let store = &inbox.p.backends.store;
    let Some(actor) = inbox.local_actor(info.object_id.as_deref()).await? else {
        return Ok(());
    };
    let instance = inbox.p.instance_actor().await?;
    let Some(remote) = inbox.resolver.resolve(&info.actor, &instance).await? else {
        tracing::warn!(actor = %info.actor, "follower has no inbox; follow ignored");
        return Ok(());
    };
    let follower = Follower {
        host: inbox_host(&remote.inbox).unwrap_or_default(),
        actor: info.actor.clone(),
        inbox: remote.inbox,
        shared_inbox: remote.shared_inbox,
        follow_id: info.id.clone(),
    };
    if actor.manually_approves_followers {
        store.add_follow_request(actor.id, &follower, json).await?;
        tracing::info!(actor = %actor.name, follower = %info.actor, "follow awaits approval");
        return Ok(());
    }
    store.add_follower(actor.id, &follower).await?;
    publish::answer_follow(
        &inbox.p.cfg,
        &inbox.p.backends,
        &actor,
        json,
        &info.actor,
        info.id.as_deref(),
        publish::FollowAnswer::Accept,
    )
    .await?;
    tracing::info!(actor = %actor.name, follower = %info.actor, "follow accepted");
    Ok(())
}
