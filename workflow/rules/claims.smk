# claims stage (rules added by its issue).
