//! The REDO journal that makes commands durable before they are acknowledged.
