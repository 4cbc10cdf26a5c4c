-- A member row's insert bumps its group's counters in the same statement, so recording a
-- member is one write statement (an upsert that inserts nothing for a slot already taken,
-- which fires no insert trigger).
CREATE TRIGGER group_members_count AFTER INSERT ON group_members
BEGIN
    UPDATE groups SET succeeded = succeeded + NEW.succeeded, failed = failed + (1 - NEW.succeeded)
    WHERE id = NEW.group_id;
END;
