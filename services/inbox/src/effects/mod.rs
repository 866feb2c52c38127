//! The side effects stampede itself owns on inbound activities, one file per
//! kind, behind one dispatch the compiler checks: every [`Effect`] has its
//! `apply`, and [`Effect::of`] is the only list of the kinds that have one.
//! Every other kind goes to the application untouched.
use serde_json::Value;
use stampede_federation::verify::ActivityInfo;

use crate::{Inbox, InboxError};

mod delete;
mod follow;
mod undo;
mod update;

/// An inbound activity kind stampede acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// A remote actor follows a local one.
    Follow,
    /// A remote actor undoes its `Follow`.
    Undo,
    /// A remote actor is deleted.
    Delete,
    /// A remote actor's document changed.
    Update,
}

impl Effect {
    /// The effect of an activity of type `kind`, if stampede has one.
    pub(crate) fn of(kind: &str) -> Option<Effect> {
        match kind {
            "Follow" => Some(Effect::Follow),
            "Undo" => Some(Effect::Undo),
            "Delete" => Some(Effect::Delete),
            "Update" => Some(Effect::Update),
            _ => None,
        }
    }
}

/// A verified activity as the effects read it.
pub(crate) struct Context<'a> {
    /// The activity.
    pub json: &'a Value,
    /// What verification read of it.
    pub info: &'a ActivityInfo,
    /// The actor's key that signed the request; `None` when another
    /// server's key signed it (a forward the actor's proof vouches for).
    pub key_id: Option<&'a str>,
    /// The actor's `assertionMethod` key its Object Integrity Proof
    /// verified with, if it had one.
    pub proof_key_id: Option<&'a str>,
}

impl Inbox {
    /// Applies `effect` to the verified activity in `cx`.
    pub(crate) async fn apply(&self, effect: Effect, cx: &Context<'_>) -> Result<(), InboxError> {
        match effect {
            Effect::Follow => follow::apply(self, cx).await,
            Effect::Undo => undo::apply(self, cx).await,
            Effect::Delete => delete::apply(self, cx).await,
            Effect::Update => update::apply(self, cx).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Effect;

    #[test]
    fn only_the_kinds_stampede_owns_have_effects() {
        for (kind, effect) in [
            ("Follow", Some(Effect::Follow)),
            ("Undo", Some(Effect::Undo)),
            ("Delete", Some(Effect::Delete)),
            ("Update", Some(Effect::Update)),
            ("Create", None),
            ("Like", None),
            ("Announce", None),
            ("follow", None),
        ] {
            assert_eq!(Effect::of(kind), effect, "{kind}");
        }
    }
}
