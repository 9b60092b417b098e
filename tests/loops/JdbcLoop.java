// A JDBC loop for the end-to-end tests (tests/postgres_sql.rs): pgjdbc from
// Debian (libpostgresql-jdbc-java) run with Java's source launcher through
// `loopgate exec`, as an unprivileged tagged process. No password: the
// agent holds the credential. One line per step.
//
// Usage: java -cp /usr/share/java/postgresql.jar JdbcLoop.java HOST PORT

import java.sql.*;

public class JdbcLoop {
    static String failure(SQLException e) {
        return e.getSQLState() + " " + e.getMessage().split("\n")[0];
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1]
            + "/postgres?user=x&sslmode=disable&connectTimeout=10";
        try (Connection c = DriverManager.getConnection(url)) {
            // Ten executions: past pgjdbc's prepareThreshold (5) it uses a
            // named server-side statement and binary results.
            String last = "";
            try (PreparedStatement ps = c.prepareStatement("SELECT id, email FROM orders WHERE id = ?")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        last = rs.getInt(1) + " " + rs.getString(2);
                    }
                }
            }
            System.out.println("prepared " + last);

            try (Statement st = c.createStatement()) {
                st.executeUpdate("DELETE FROM orders");
                System.out.println("delete not refused");
            } catch (SQLException e) {
                System.out.println("refused " + failure(e));
            }

            // A batch (pipelined, one Sync) with a refused statement in it:
            // none of the batch runs.
            try (Statement st = c.createStatement()) {
                st.addBatch("INSERT INTO orders VALUES (50, NULL)");
                st.addBatch("TRUNCATE orders");
                st.executeBatch();
                System.out.println("batch ran");
            } catch (BatchUpdateException e) {
                System.out.println("batch refused " + e.getSQLState());
            }

            // A transaction with a refusal in it still commits its work.
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO orders VALUES (?, ?)")) {
                ins.setInt(1, 60);
                ins.setString(2, "jdbc@example.com");
                ins.executeUpdate();
            }
            try (Statement st = c.createStatement()) {
                st.executeUpdate("UPDATE orders SET email = NULL");
            } catch (SQLException e) {
                System.out.println("in transaction " + e.getSQLState());
            }
            c.commit();
            c.setAutoCommit(true);
            try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SELECT count(*) FROM orders")) {
                rs.next();
                System.out.println("committed " + rs.getLong(1));
            }

            // A cancel from another thread (pgjdbc opens a new connection
            // with the cancel key the agent gave it).
            try (Statement st = c.createStatement()) {
                Thread t = new Thread(() -> {
                    try {
                        Thread.sleep(700);
                        st.cancel();
                    } catch (Exception e) {
                        System.out.println("cancel failed " + e);
                    }
                });
                t.start();
                try {
                    st.executeQuery("SELECT pg_sleep(30)");
                    System.out.println("not cancelled");
                } catch (SQLException e) {
                    System.out.println("cancelled " + e.getSQLState());
                }
                t.join();
            }
            try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SELECT 1")) {
                rs.next();
                System.out.println("after " + rs.getInt(1));
            }
        }
    }
}
