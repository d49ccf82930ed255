//! The checked-in AsyncAPI document matches the code.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;

/// Fails when `docs/asyncapi.json` drifts from the events and the topology;
/// `ORDERFLOW_UPDATE_SCHEMAS=1` rewrites it.
#[test]
fn checked_in_asyncapi_document_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/asyncapi.json");
    let generated =
        serde_json::to_string_pretty(&orderflow_messaging::asyncapi::document()).unwrap() + "\n";
    if std::env::var_os("ORDERFLOW_UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/asyncapi.json drifted from the code; regenerate with \
         ORDERFLOW_UPDATE_SCHEMAS=1 cargo test -p orderflow-messaging --test asyncapi"
    );
}

#[test]
fn every_channel_has_a_sender_and_every_consumed_channel_a_receiver() {
    let doc = orderflow_messaging::asyncapi::document();
    let operations = doc["operations"].as_object().unwrap();
    for (channel, _) in doc["channels"].as_object().unwrap() {
        let reference = format!("#/channels/{channel}");
        let sends = operations
            .values()
            .filter(|o| o["action"] == "send" && o["channel"]["$ref"] == reference.as_str())
            .count();
        assert_eq!(sends, 1, "{channel} has exactly one owner");
    }
    let receives = operations
        .values()
        .filter(|o| o["action"] == "receive")
        .count();
    assert!(
        receives >= 9,
        "the saga's consumers are documented: {receives}"
    );
    assert_eq!(
        doc["channels"]["orders_created"]["address"],
        "orders.created"
    );
}
