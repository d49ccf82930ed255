//! Who may do what on NATS: each service's permissions, derived from the topology, and the
//! `authorization` block of a nats-server configuration that grants them.
//!
//! A service may publish its own events (its subject prefix) and dead letters, pull from and
//! acknowledge its own durable consumers (and the shared advisory consumer), reconcile the
//! streams, read messages back for dead-lettering, delete dead letters, and receive replies
//! on its own inbox prefix — nothing else: the inventory service cannot publish an
//! `orders.created` or a `payments.completed`, nor read another service's consumer. The
//! operator (`orderflow dlq`) may do anything in the account.
//!
//! `orderflow up` writes this block with the nkeys it generates; `deploy/nats/auth.conf` is
//! the same block with the public nkeys taken from environment variables, and a test keeps it
//! equal to what this module makes.

use std::fmt::Write as _;

use orderflow_contracts::names::{consumers, streams, subjects};

use crate::Topology;

/// What one user may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish on.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// A service's place on NATS: the events it publishes and the consumers it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceAccess {
    /// The service (its NATS client name).
    pub service: &'static str,
    /// The subjects of its events (its stream's).
    pub publishes: &'static str,
    /// Its durable consumers.
    pub consumers: &'static [&'static str],
}

/// Every service's place on NATS.
pub const SERVICES: [ServiceAccess; 3] = [
    ServiceAccess {
        service: "order-service",
        publishes: "orders.>",
        consumers: &[consumers::ORDER_INVENTORY, consumers::ORDER_PAYMENTS],
    },
    ServiceAccess {
        service: "inventory-service",
        publishes: "inventory.>",
        consumers: &[consumers::INVENTORY_ORDERS, consumers::INVENTORY_PAYMENTS],
    },
    ServiceAccess {
        service: "payment-service",
        publishes: "payments.>",
        consumers: &[consumers::PAYMENT_INVENTORY, consumers::PAYMENT_ORDERS],
    },
];

/// Consumers every service reads (competing): the max-deliveries advisories.
pub const SHARED_CONSUMERS: &[&str] = &[consumers::DEAD_LETTER_ADVISORIES];

/// A new user nkey: `(seed, public key)`. The seed (`SU…`) is the client's secret; the
/// server's configuration holds only the public key (`U…`).
pub fn new_user_nkey() -> (String, String) {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair
        .seed()
        .unwrap_or_else(|_| unreachable!("a generated key pair has its seed"));
    (seed, pair.public_key())
}

/// The public key of a user nkey seed.
pub fn public_key(seed: &str) -> Result<String, String> {
    nkeys::KeyPair::from_seed(seed.trim())
        .map(|pair| pair.public_key())
        .map_err(|e| format!("not an nkey seed: {e}"))
}

/// The user name of the operator in generated configurations.
pub const OPERATOR: &str = "operator";

/// The inbox prefix of a client: replies to its requests (JetStream API answers, publish
/// acknowledgements, pulled messages) arrive under it, and only it may subscribe there.
pub fn inbox_prefix(client_name: &str) -> String {
    let clean: String = client_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("_INBOX_{clean}")
}

/// The permissions of `service` (one of [`SERVICES`]) in `topology`.
pub fn service_permissions(topology: &Topology, service: &ServiceAccess) -> Permissions {
    let mut publish = vec![
        service.publishes.to_owned(),
        format!("{}.>", subjects::DEAD_LETTER_PREFIX),
        // Acknowledgements (ack, nak, progress, term). NATS 2.15 replies on v2 subjects
        // (`$JS.ACK.<domain>.<account hash>.<stream>...`), so no narrower pattern matches.
        "$JS.ACK.>".to_owned(),
        "$JS.API.INFO".to_owned(),
    ];
    for stream in &topology.streams {
        for call in ["INFO", "CREATE", "UPDATE", "MSG.GET"] {
            publish.push(format!("$JS.API.STREAM.{call}.{}", stream.name));
        }
        publish.push(format!("$JS.API.DIRECT.GET.{}", stream.name));
        publish.push(format!("$JS.API.DIRECT.GET.{}.>", stream.name));
    }
    publish.push(format!(
        "$JS.API.STREAM.MSG.DELETE.{}",
        streams::DEAD_LETTERS
    ));
    let own = service.consumers.iter().chain(SHARED_CONSUMERS);
    for durable in own {
        let Some(spec) = topology.consumer(durable) else {
            continue;
        };
        let (s, c) = (spec.stream, spec.durable);
        publish.extend([
            format!("$JS.API.CONSUMER.INFO.{s}.{c}"),
            format!("$JS.API.CONSUMER.CREATE.{s}.{c}"),
            format!("$JS.API.CONSUMER.CREATE.{s}.{c}.>"),
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{s}.{c}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{c}"),
        ]);
    }
    Permissions {
        publish,
        subscribe: vec![format!("{}.>", inbox_prefix(service.service))],
    }
}

/// The operator's permissions: everything in the account.
pub fn operator_permissions() -> Permissions {
    Permissions {
        publish: vec![">".to_owned()],
        subscribe: vec![">".to_owned()],
    }
}

/// The `authorization` block of a nats-server configuration with one nkey user per
/// `(public nkey, permissions)`; the nkey is written as given, so a `$VARIABLE` reads it from
/// the server's environment. Connections without one of these nkeys are refused.
pub fn authorization_block(users: &[(String, Permissions)]) -> String {
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("\n          \"{s}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = String::from("authorization {\n  users = [\n");
    for (nkey, permissions) in users {
        let _ = write!(
            out,
            "    {{\n      nkey: {nkey}\n      permissions: {{\n        publish: {{ allow: [{}\n        ] }}\n        subscribe: {{ allow: [{}\n        ] }}\n      }}\n    }}\n",
            list(&permissions.publish),
            list(&permissions.subscribe),
        );
    }
    out.push_str("  ]\n}\n");
    out
}

/// The environment variable `deploy/nats/auth.conf` reads a user's public nkey from:
/// `ORDER_SERVICE_NKEY`, …, `OPERATOR_NKEY`.
pub fn nkey_variable(user: &str) -> String {
    format!("{}_NKEY", user.to_ascii_uppercase().replace('-', "_"))
}

/// `deploy/nats/auth.conf`: every service and the operator, their public nkeys from the
/// environment (see [`nkey_variable`]).
pub fn deploy_authorization(topology: &Topology) -> String {
    let mut users: Vec<(String, Permissions)> = SERVICES
        .iter()
        .map(|s| {
            (
                format!("${}", nkey_variable(s.service)),
                service_permissions(topology, s),
            )
        })
        .collect();
    users.push((
        format!("${}", nkey_variable(OPERATOR)),
        operator_permissions(),
    ));
    format!(
        "# Generated from crates/messaging/src/access.rs: do not edit. tools/orderflow/tests/\n\
         # deploy_config.rs keeps it equal to the code (ORDERFLOW_BLESS=1 rewrites it).\n\
         # Who may do what on NATS: one nkey user per service and one for the operator.\n\
         # The public nkeys come from the environment: {}.\n\
         # Anonymous connections are refused.\n{}",
        SERVICES
            .iter()
            .map(|s| nkey_variable(s.service))
            .chain([nkey_variable(OPERATOR)])
            .collect::<Vec<_>>()
            .join(", "),
        authorization_block(&users)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TopologySettings;

    #[test]
    fn every_consumer_has_one_owner() {
        let topology = Topology::orderflow(&TopologySettings::default());
        for spec in &topology.consumers {
            let owners = SERVICES
                .iter()
                .filter(|s| s.consumers.contains(&spec.durable))
                .count();
            let shared = SHARED_CONSUMERS.contains(&spec.durable);
            assert!(
                (owners == 1) != shared,
                "{} has {owners} owners (shared: {shared})",
                spec.durable
            );
        }
        for service in SERVICES {
            for durable in service.consumers {
                assert!(topology.consumer(durable).is_some(), "{durable} undeclared");
            }
        }
    }

    #[test]
    fn a_service_publishes_only_its_own_events() {
        let topology = Topology::orderflow(&TopologySettings::default());
        let inventory = service_permissions(&topology, &SERVICES[1]);
        assert!(inventory.publish.contains(&"inventory.>".to_owned()));
        for foreign in ["orders.>", "payments.>", ">", "orders.created"] {
            assert!(
                !inventory.publish.contains(&foreign.to_owned()),
                "{foreign}"
            );
        }
        assert!(
            inventory.publish.iter().all(|s| !s.contains("CONSUMER")
                || s.contains("inventory-")
                || s.contains("dead-letter-advisories")),
            "{inventory:?}"
        );
        assert_eq!(inventory.subscribe, ["_INBOX_inventory-service.>"]);
        assert_eq!(inbox_prefix("a b.c"), "_INBOX_a_b_c");
        assert_eq!(nkey_variable("payment-service"), "PAYMENT_SERVICE_NKEY");
        let (seed, public) = new_user_nkey();
        assert!(
            seed.starts_with("SU") && public.starts_with('U'),
            "{public}"
        );
    }
}
