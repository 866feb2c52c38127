//! What a process runs: one of the four services on its own, or all of them
//! in one (`stampede up`). Names derive from here: the CLI's `serve` verbs,
//! `STAMPEDE_UP_SERVICES`, gRPC health service names, broker connection
//! names.

/// One of stampede's four services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// The edge: inboxes, actor documents, the gRPC API.
    Ingest,
    /// Verification and the inbound side effects.
    Inbox,
    /// One activity into its target inboxes.
    Fanout,
    /// Signed POSTs with retries, host limits and circuit breakers.
    Delivery,
}

impl ServiceKind {
    /// Every service, in the order of the pipeline's description.
    pub const ALL: [ServiceKind; 4] = [
        ServiceKind::Ingest,
        ServiceKind::Inbox,
        ServiceKind::Fanout,
        ServiceKind::Delivery,
    ];

    /// Its name (`ingest`, `inbox`, `fanout`, `delivery`).
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Ingest => "ingest",
            ServiceKind::Inbox => "inbox",
            ServiceKind::Fanout => "fanout",
            ServiceKind::Delivery => "delivery",
        }
    }

    /// The service named `name` (any case, surrounding blanks ignored).
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// Its gRPC health service name (`stampede.{name}`).
    pub fn health_name(self) -> &'static str {
        match self {
            ServiceKind::Ingest => "stampede.ingest",
            ServiceKind::Inbox => "stampede.inbox",
            ServiceKind::Fanout => "stampede.fanout",
            ServiceKind::Delivery => "stampede.delivery",
        }
    }
}

impl std::fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// One service on its own (`stampede serve X`): RabbitMQ, Redis and
    /// PostgreSQL required.
    Service(ServiceKind),
    /// The services of `STAMPEDE_UP_SERVICES` in one process (`stampede
    /// up`): the embedded backends where a URL is unset.
    AllInOne,
}

impl Role {
    /// Its name (a service's, or `up`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Service(k) => k.name(),
            Role::AllInOne => "up",
        }
    }

    /// Whether it serves the public HTTP listener (ingest's edge).
    pub fn serves_http(self) -> bool {
        matches!(self, Role::Service(ServiceKind::Ingest) | Role::AllInOne)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_go_both_ways() {
        for k in ServiceKind::ALL {
            assert_eq!(ServiceKind::from_name(k.name()), Some(k));
            assert_eq!(k.health_name(), format!("stampede.{k}"));
        }
        assert_eq!(
            ServiceKind::from_name(" Ingest "),
            Some(ServiceKind::Ingest)
        );
        assert_eq!(ServiceKind::from_name("up"), None);
        assert_eq!(Role::AllInOne.name(), "up");
        assert!(Role::Service(ServiceKind::Ingest).serves_http());
        assert!(!Role::Service(ServiceKind::Delivery).serves_http());
    }
}
