CREATE SCHEMA tenant_acme;
CREATE SCHEMA tenant_globex;
CREATE TABLE tenant_acme.leads (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE tenant_globex.leads (id serial PRIMARY KEY, name text NOT NULL);
INSERT INTO tenant_acme.leads (name) VALUES ('Wile E. Coyote'), ('Road Runner');
INSERT INTO tenant_globex.leads (name) VALUES ('Hank Scorpio');
