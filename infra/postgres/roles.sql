-- A least-privilege role for gravl-dr (PostgreSQL 15). Set its password out of band and give
-- it to gravl-dr through .pgpass, never in gravl-dr.yaml.
CREATE ROLE gravl_dr WITH LOGIN REPLICATION BYPASSRLS;  -- row-level security must not hide rows from backups, counts and checks
GRANT pg_read_all_data TO gravl_dr;        -- pg_dump and per-table row counts
GRANT pg_read_all_settings TO gravl_dr;    -- data_directory, wal_segment_size
GRANT pg_read_all_stats TO gravl_dr;       -- pg_stat_archiver, pg_stat_replication
GRANT pg_monitor TO gravl_dr;
GRANT EXECUTE ON FUNCTION pg_control_system() TO gravl_dr;
GRANT EXECUTE ON FUNCTION pg_control_checkpoint() TO gravl_dr;
GRANT EXECUTE ON FUNCTION pg_switch_wal() TO gravl_dr;
-- Failover promotes and fences, which needs a superuser (or pg_promote granted explicitly):
GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO gravl_dr;
