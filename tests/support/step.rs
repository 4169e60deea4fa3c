//! The environment the platform gives a step running `chatgpt-component sailor`.

use super::rabbit::Topology;

/// What differs between callers; everything else is a fixed test identity.
pub struct StepEnv<'a> {
    pub platform_uri: &'a str,
    pub platform_key: &'a str,
    pub amqp_uri: &'a str,
    pub topology: &'a Topology,
    pub crypto_password: &'a str,
    pub crypto_iv: &'a str,
    pub storage_token: &'a str,
}

impl StepEnv<'_> {
    /// `ELASTICIO_*` variables for flow `flow-1`, step `step_2`, action `sendRequest`.
    pub fn vars(&self) -> Vec<(String, String)> {
        let t = self.topology;
        [
            ("FLOW_ID", "flow-1"),
            ("EXEC_ID", "exec-1"),
            ("STEP_ID", "step_2"),
            ("CONTAINER_ID", "container-1"),
            ("WORKSPACE_ID", "workspace-1"),
            ("USER_ID", "user-1"),
            ("COMP_ID", "comp-1"),
            ("FUNCTION", "sendRequest"),
            ("API_URI", self.platform_uri),
            ("API_USERNAME", "task-user"),
            ("API_KEY", self.platform_key),
            ("AMQP_URI", self.amqp_uri),
            ("LISTEN_MESSAGES_ON", &t.input_queue),
            ("PUBLISH_MESSAGES_TO", &t.exchange),
            ("DATA_ROUTING_KEY", &t.data_key),
            ("ERROR_ROUTING_KEY", &t.error_key),
            ("REBOUND_ROUTING_KEY", &t.rebound_key),
            ("SNAPSHOT_ROUTING_KEY", &t.snapshot_key),
            ("MESSAGE_CRYPTO_IV", self.crypto_iv),
            ("MESSAGE_CRYPTO_PASSWORD", self.crypto_password),
            ("OBJECT_STORAGE_URI", self.platform_uri),
            ("OBJECT_STORAGE_TOKEN", self.storage_token),
        ]
        .into_iter()
        .map(|(k, v)| (format!("ELASTICIO_{k}"), v.to_string()))
        .collect()
    }
}
