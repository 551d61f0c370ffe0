-- The schema as version 1 created it on SQLite (connector/store/schema.py at commit a3d2c26,
-- compiled by SQLAlchemy's create_all), for tests/test_migrate.py.

CREATE TABLE conflicts (
    id INTEGER NOT NULL,
    dispensary VARCHAR(128) NOT NULL,
    customer_id VARCHAR(128) NOT NULL,
    destination VARCHAR(128) NOT NULL,
    kind VARCHAR(64) NOT NULL,
    detail TEXT NOT NULL,
    created_at FLOAT NOT NULL,
    PRIMARY KEY (id)
);

CREATE TABLE connector_meta (
    "key" VARCHAR(64) NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY ("key")
);

CREATE TABLE contacts (
    dispensary VARCHAR(128) NOT NULL,
    customer_id VARCHAR(128) NOT NULL,
    destination VARCHAR(128) NOT NULL,
    contact_id VARCHAR(255),
    delivered_hash VARCHAR(64),
    unsubscribed BOOLEAN NOT NULL,
    deactivated BOOLEAN NOT NULL,
    ops_planned INTEGER NOT NULL,
    updated_at FLOAT NOT NULL,
    PRIMARY KEY (dispensary, customer_id, destination)
);

CREATE TABLE customers (
    dispensary VARCHAR(128) NOT NULL,
    customer_id VARCHAR(128) NOT NULL,
    last_update_us BIGINT,
    content_hash VARCHAR(64),
    opt_out BOOLEAN,
    merged_into VARCHAR(128),
    merges TEXT NOT NULL,
    updated_at FLOAT NOT NULL,
    PRIMARY KEY (dispensary, customer_id)
);

CREATE TABLE dead_letters (
    id INTEGER NOT NULL,
    outbox_id INTEGER,
    dispensary VARCHAR(128) NOT NULL,
    destination VARCHAR(128) NOT NULL,
    customer_id VARCHAR(128) NOT NULL,
    op VARCHAR(16) NOT NULL,
    payload TEXT NOT NULL,
    idempotency_key VARCHAR(64) NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    status_code INTEGER,
    response_body TEXT,
    created_at FLOAT NOT NULL,
    replayed_at FLOAT,
    PRIMARY KEY (id)
);
CREATE INDEX ix_dead_letters_open ON dead_letters (dispensary, destination, replayed_at);

CREATE TABLE inbox (
    id INTEGER NOT NULL,
    dispensary VARCHAR(128) NOT NULL,
    source VARCHAR(16) NOT NULL,
    event_type VARCHAR(64) NOT NULL,
    customer_id VARCHAR(128),
    last_update_us BIGINT,
    received_at FLOAT NOT NULL,
    body TEXT,
    status VARCHAR(16) NOT NULL,
    processed_at FLOAT,
    PRIMARY KEY (id)
);
CREATE INDEX ix_inbox_customer ON inbox (dispensary, customer_id);
CREATE INDEX ix_inbox_pending ON inbox (status, id);

CREATE TABLE outbox (
    id INTEGER NOT NULL,
    dispensary VARCHAR(128) NOT NULL,
    destination VARCHAR(128) NOT NULL,
    order_key VARCHAR(128) NOT NULL,
    customer_id VARCHAR(128) NOT NULL,
    op VARCHAR(16) NOT NULL,
    payload TEXT NOT NULL,
    idempotency_key VARCHAR(64) NOT NULL,
    status VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL,
    created_at FLOAT NOT NULL,
    first_attempt_at FLOAT,
    next_attempt_at FLOAT NOT NULL,
    claimed_by VARCHAR(64),
    claimed_until FLOAT,
    last_error TEXT,
    done_at FLOAT,
    PRIMARY KEY (id),
    CONSTRAINT uq_outbox_key UNIQUE (dispensary, destination, idempotency_key)
);
CREATE INDEX ix_outbox_order ON outbox (dispensary, destination, order_key, id);
CREATE INDEX ix_outbox_queue ON outbox (dispensary, destination, status, id);

CREATE TABLE processes (
    id VARCHAR(64) NOT NULL,
    host VARCHAR(255) NOT NULL,
    pid INTEGER NOT NULL,
    started_at FLOAT NOT NULL,
    heartbeat_at FLOAT NOT NULL,
    PRIMARY KEY (id)
);

CREATE TABLE quarantine (
    id INTEGER NOT NULL,
    dispensary VARCHAR(128) NOT NULL,
    received_at FLOAT NOT NULL,
    status_code INTEGER NOT NULL,
    reason TEXT NOT NULL,
    content_type VARCHAR(255),
    body BLOB,
    PRIMARY KEY (id)
);

INSERT INTO connector_meta (key, value) VALUES ('schema_version', '1');
