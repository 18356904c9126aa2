-- The schema that taskmill 0.1's first version created, before it had migrations.
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
	control VARCHAR(16), 
	owner VARCHAR(64), 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	updated_at DATETIME NOT NULL, 
	CONSTRAINT pk_tasks PRIMARY KEY (id)
);
CREATE INDEX ix_tasks_name_created_at ON tasks (name, created_at);
CREATE INDEX ix_tasks_status_created_at ON tasks (status, created_at);
CREATE INDEX ix_tasks_created_at ON tasks (created_at);
CREATE TABLE task_events (
	id INTEGER NOT NULL, 
	task_id VARCHAR(36) NOT NULL, 
	from_status VARCHAR(16), 
	to_status VARCHAR(16) NOT NULL, 
	at DATETIME NOT NULL, 
	reason TEXT NOT NULL, 
	CONSTRAINT pk_task_events PRIMARY KEY (id), 
	CONSTRAINT fk_task_events_task_id_tasks FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
CREATE INDEX ix_task_events_task_id ON task_events (task_id);
