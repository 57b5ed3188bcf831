-- Run in EVERY database that holds large objects, as their owner or a superuser, after roles.sql
-- (and again after new large objects appear). PostgreSQL 15's pg_read_all_data does not cover
-- large objects, so without this a logical backup as gravl_dr fails with "permission denied
-- for large object" (it never skips them silently).
DO $$
DECLARE lo oid;
BEGIN
  FOR lo IN SELECT oid FROM pg_largeobject_metadata LOOP
    EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO gravl_dr', lo);
  END LOOP;
END $$;
