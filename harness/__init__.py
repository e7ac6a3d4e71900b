"""What the tests and the bench share: the services started as users start them (a backend, the
UI, Chromium) and waited for, and the JSON Schemas both feed the grammar engine."""
