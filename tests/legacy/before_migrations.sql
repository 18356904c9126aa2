-- The schema of the last taskmill version before migrations (leases, retries, warnings).
CREATE TABLE tasks (
	id VARCHAR(36) NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	params JSON NOT NULL, 
	result JSON, 
	error JSON, 
	progress FLOAT NOT NULL, 
	message TEXT, 
	checkpoint JSON, 
	attempts INTEGER NOT NULL, 
	recoveries INTEGER NOT NULL, 
	failures INTEGER DEFAULT '0' NOT NULL, 
	control VARCHAR(16), 
	owner VARCHAR(64), 
	lease_expires_at DATETIME, 
	heartbeat_at DATETIME, 
	run_after DATETIME, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	updated_at DATETIME NOT NULL, 
	CONSTRAINT pk_tasks PRIMARY KEY (id)
);
CREATE INDEX ix_tasks_updated_at_id ON tasks (updated_at, id);
CREATE INDEX ix_tasks_created_at_id ON tasks (created_at, id);
CREATE INDEX ix_tasks_status_created_at_id ON tasks (status, created_at, id);
CREATE INDEX ix_tasks_name_created_at_id ON tasks (name, created_at, id);
CREATE TABLE task_events (
	id INTEGER NOT NULL, 
	task_id VARCHAR(36) NOT NULL, 
	from_status VARCHAR(16), 
	to_status VARCHAR(16) NOT NULL, 
	at DATETIME NOT NULL, 
	reason TEXT NOT NULL, 
	kind VARCHAR(16) DEFAULT 'transition' NOT NULL, 
	CONSTRAINT pk_task_events PRIMARY KEY (id), 
	CONSTRAINT fk_task_events_task_id_tasks FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
CREATE INDEX ix_task_events_task_id ON task_events (task_id);
